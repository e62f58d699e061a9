"""Runs of the main job shared by test modules: the tiny plumbing loop and the shortened demo.

`uninterrupted(tmp_path_factory)` runs ``python -m oel_jax.main --config=configs/tiny.py
--workdir=DIR`` once per test session and returns the workdir, the process result and its wall
time; later calls return the same run. `short_demo(tmp_path_factory)` does the same for the
learning demo (the README's default config) with the `SHORT_DEMO` overrides. `run_main` starts the CLI as a subprocess, the way a
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


SHORT_DEMO = ("--config.evaluation.num_games=24",)
"""The learning demo shortened for CI: 24 held-out games per evaluation instead of 32."""

_DEMO_RUN: list[Run] = []


def short_demo(tmp_path_factory) -> Run:
  """The session's one run of the shortened learning demo (made on first use)."""
  if not _DEMO_RUN:
    from oel_jax.demo import demo_config_path  # pylint: disable=import-outside-toplevel

    workdir = str(tmp_path_factory.mktemp("demo") / "run")
    start = time.perf_counter()
    process = run_main(f"--config={demo_config_path()}", f"--workdir={workdir}", *SHORT_DEMO)
    _DEMO_RUN.append(Run(workdir, process, time.perf_counter() - start))
  return _DEMO_RUN[0]
