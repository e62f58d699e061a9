"""One uninterrupted run of the README's main job (the tiny loop), shared by test modules.

`uninterrupted(tmp_path_factory)` runs ``python -m oel_jax.main --workdir=DIR`` once per test
session (the README's command plus a workdir) and returns the workdir, the process result and
its wall time; later calls return the same run. `run_main` starts the same command as a
subprocess, the way a user's shell would.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_env() -> dict[str, str]:
  """The environment of a user's shell: one CPU device (the test session's 8 are dropped)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.setdefault("HF_HUB_OFFLINE", "1")
  return env


def main_command(*args: str) -> list[str]:
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
