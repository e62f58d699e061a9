"""The README's main-job command and CI's test command."""

import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands() -> list[str]:
  readme = open(os.path.join(ROOT, "README.md")).read()
  return re.findall(r"```bash\n(.+?)\n```", readme)


def test_ci_runs_exactly_the_readme_test_command():
  test_command = _readme_commands()[1]
  assert "pytest" in test_command
  ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
  assert test_command in ci


def test_main_job_runs_on_the_tiny_default_in_under_a_minute():
  main_command = _readme_commands()[0]
  assert main_command.endswith("python -m oel_jax.main")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-m", "oel_jax.main", "--top=3"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  elapsed = time.perf_counter() - start
  assert out.returncode == 0, out.stderr[-2000:]
  assert "<|im_start|>assistant\n" in out.stdout
  candidates = re.findall(r"^\s+(\d\.\d+)\s+id\s+(\d+)", out.stdout, re.M)
  assert len(candidates) == 3
  probs = [float(p) for p, _ in candidates]
  assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
  assert elapsed < 60, f"main job took {elapsed:.0f}s"
