"""One uninterrupted run of the tiny plumbing loop (``configs/tiny.py``), shared by test modules.

`uninterrupted(tmp_path_factory)` runs ``python -m oel_jax.main --config=configs/tiny.py
--workdir=DIR`` once per test session and returns the workdir, the process result and its wall
time; later calls return the same run. `run_main` starts the CLI as a subprocess, the way a
user's shell would, on the tiny config unless the arguments name a ``--config``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.py")


def main_env() -> dict[str, str]:
  """The environment of a user's shell: one CPU device (the test session's 8 are dropped)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.setdefault("HF_HUB_OFFLINE", "1")
  return env


def main_command(*args: str) -> list[str]:
  """The CLI with ``args``; on the tiny config unless they name one."""
  if not any(a.startswith(("--config=", "-config=")) or a in ("--config", "-config")
             for a in args):
    args = (f"--config={TINY_CONFIG}", *args)
  return [sys.executable, "-m", "oel_jax.main", *args]


def run_main(*args: str, env: dict[str, str] | None = None, timeout: float = 900
             ) -> subprocess.CompletedProcess:
  """Runs the CLI to completion."""
  return subprocess.run(main_command(*args), cwd=ROOT, env=env or main_env(),
                        capture_output=True, text=True, timeout=timeout)


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run of the main job."""

  workdir: str
  """Its workdir."""
  process: subprocess.CompletedProcess
  """Return code and output."""
  seconds: float
  """Wall time of the command."""


_RUN: list[Run] = []


def uninterrupted(tmp_path_factory) -> Run:
  """The session's one uninterrupted tiny run (made on first use)."""
  if not _RUN:
    workdir = str(tmp_path_factory.mktemp("tiny_loop") / "run")
    start = time.perf_counter()
    process = run_main(f"--workdir={workdir}")
    _RUN.append(Run(workdir, process, time.perf_counter() - start))
  return _RUN[0]
