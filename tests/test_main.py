"""The README's main-job command (the tiny online loop), the CLI's other stages, CI's command."""

import os
import re

import pytest

import tiny_loop_run
from tiny_loop_run import ROOT, main_env, run_main


def _readme_commands() -> list[str]:
  readme = open(os.path.join(ROOT, "README.md")).read()
  return re.findall(r"```bash\n(.+?)\n```", readme)


@pytest.fixture(scope="module", name="tiny_run")
def fixture_tiny_run(tmp_path_factory):
  return tiny_loop_run.uninterrupted(tmp_path_factory)


def test_ci_runs_exactly_the_readme_test_command():
  test_command = _readme_commands()[1]
  assert "pytest" in test_command
  ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
  assert test_command in ci


def test_main_job_runs_two_tiny_rounds_in_a_few_minutes(tiny_run):
  main_command = _readme_commands()[0]
  assert main_command.endswith("python -m oel_jax.main")
  out = tiny_run.process
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"^  round 1: pass rate \d\.\d{3}", out.stdout, re.M), out.stdout
  assert "final model: " + os.path.join(tiny_run.workdir, "round_001", "model") in out.stdout
  assert tiny_run.seconds < 480, f"main job took {tiny_run.seconds:.0f}s"


def test_running_the_finished_command_again_does_nothing_new(tiny_run):
  marker = os.path.join(tiny_run.workdir, "round_001", "consolidate.done.json")
  before = os.path.getmtime(marker)
  out = run_main(f"--workdir={tiny_run.workdir}", "--stage=export", timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "export: done for every round" in out.stdout
  assert os.path.getmtime(marker) == before


def test_probe_prints_next_token_candidates():
  out = run_main("--stage=probe", "--top=3", timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "<|im_start|>assistant\n" in out.stdout
  candidates = re.findall(r"^\s+(\d\.\d+)\s+id\s+(\d+)", out.stdout, re.M)
  assert len(candidates) == 3
  probs = [float(p) for p, _ in candidates]
  assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1


def test_bad_config_values_fail_before_any_work(tmp_path):
  workdir = tmp_path / "never"
  env = dict(main_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = run_main(f"--workdir={workdir}", "--config.train.k=5000", "--config.env=chess",
                 env=env, timeout=300)
  assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
  err = out.stderr
  assert "config.train.k (5000) exceeds the model's vocabulary (2048 rows)" in err
  assert "config.env: unknown environment 'chess'; known: frozenlake, sokoban" in err
  # Two games per step cannot be split over the 4 devices of the mesh.
  assert ("config.consolidation.games_per_step (2) / config.train.micro_batches (1) is not "
          "divisible by the mesh's data x fsdp = 4 devices") in err
  assert not workdir.exists()


def _load_config(name: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


PAPER = {  # Table 4: format, n, L_max, learning rate, steps; K = 10 throughout.
    "qwen3_1p7b_frozenlake": ("frozenlake", "unstructured", 15, 2048, 5e-6, 20, False, True),
    "qwen3_4b_frozenlake": ("frozenlake", "structured", 25, 8192, 1e-6, 20, True, True),
    "qwen3_8b_frozenlake": ("frozenlake", "structured", 50, 8192, 1e-6, 100, True, True),
    "qwen3_4b_instruct_sokoban": ("sokoban", "structured", 50, 8192, 1e-6, 100, True, False),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_table_4_and_validate(name, tmp_path_factory):
  from oel_jax import loop, tiny
  env, fmt, n, l_max, lr, steps, with_previous, thinking = PAPER[name]
  config = _load_config(name)
  assert (config.env, config.extraction.knowledge_format, config.extraction.num_trajectories,
          config.extraction.max_knowledge_tokens, config.train.learning_rate,
          config.consolidation.steps, config.extraction.with_previous,
          config.rollout.enable_thinking) == (env, fmt, n, l_max, lr, steps, with_previous,
                                              thinking)
  assert config.extraction.num_runs == 10 and config.consolidation.games_per_step == 64
  assert config.train.k == 256 and config.evaluation.num_games == 128
  # Valid once config.model names a checkpoint directory (the tiny one stands in).
  ckpt = str(tmp_path_factory.getbasetemp() / "tiny_ckpt")
  if not os.path.isdir(ckpt):
    tiny.write_tiny_checkpoint(ckpt)
  config.model = ckpt
  p = loop.plan(config, num_devices=8)
  assert p.extraction.num_trajectories == n and p.consolidation.train.learning_rate == lr
  assert p.consolidation_games == steps * 64
  assert p.extraction_boards * p.extraction_plays == n * 10
