"""The online loop (oel_jax.loop) through its CLI: artifacts, HF export, kill and resume, config
checks.

The tiny loop runs as the README's main job does (a subprocess, one CPU device); one
uninterrupted run is shared with tests/test_main.py (`tiny_loop_run`). A second run is
SIGKILLed inside extraction (round 0) and inside consolidation (round 1), restarted with the
same command each time, and must end with the same metrics, files and weights.
"""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import tiny_loop_run
from oel_jax import config as config_lib
from oel_jax import loop, metrics
from tiny_loop_run import ROOT, main_command, main_env


@pytest.fixture(scope="module", name="tiny_run")
def fixture_tiny_run(tmp_path_factory):
  run = tiny_loop_run.uninterrupted(tmp_path_factory)
  assert run.process.returncode == 0, run.process.stderr[-3000:]
  return run


def _tiny_config():
  return config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))


ROUND_FILES = [
    "collect.done.json", "trajectories/extraction.jsonl", "trajectories/consolidation.jsonl",
    "extract.done.json", "knowledge/manifest.json", "knowledge/knowledge_0.txt",
    "knowledge/knowledge_1.txt", "knowledge/step_0001/manifest.json",
    "consolidate.done.json", "consolidation/metrics.jsonl", "model/config.json",
    "model/model.safetensors", "model/tokenizer.json", "evaluate.done.json",
    "evaluation/pass_rate.json", "evaluation/games.jsonl", "evaluation/in_context.json",
    "export.done.json",
]


def test_tiny_loop_writes_every_artifact(tiny_run):
  w = tiny_run.workdir
  for r in ("round_000", "round_001"):
    for name in ROUND_FILES:
      assert os.path.isfile(os.path.join(w, r, name)), f"{r}/{name} missing"
    assert os.listdir(os.path.join(w, r, "consolidation", "checkpoints"))
  for name in ("config.json", "summary.json", "metrics.jsonl", "initial/evaluate.done.json",
               "initial/evaluation/pass_rate.json"):
    assert os.path.isfile(os.path.join(w, name)), name
  with open(os.path.join(w, "plots", "rounds.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert any(n.startswith("events.out.tfevents")
             for n in os.listdir(os.path.join(w, "tensorboard")))

  records = metrics.read_jsonl(os.path.join(w, "metrics.jsonl"))
  stages = {(r["round"], r["stage"]) for r in records}
  assert stages == {("initial", "evaluate")} | {(r, s) for r in (0, 1) for s in loop.STAGES}
  steps = [r for r in records if r["stage"] == "consolidate" and not r.get("summary")]
  assert [(r["round"], r["step"]) for r in steps] == [(0, 1), (0, 2), (1, 1), (1, 2)]
  for r in steps:
    for key in ("loss", "kl", "student_entropy", "teacher_entropy", "grad_norm",
                "tokens_per_second"):
      assert np.isfinite(r[key]), (key, r)
    # Whether the top-k loss behaves: both models' mass on the student's top-256.
    assert 0 < r["teacher_topk_mass"] <= 1 + 1e-6 and 0 < r["student_topk_mass"] <= 1 + 1e-6, r
    assert r["skipped"] is False and r["skipped_steps"] == 0
  extract = [r for r in records if r["stage"] == "extract" and r.get("summary")]
  assert [r["unterminated_replies"] for r in extract] == [0, 0]  # thinking off
  collect = [r for r in records if r["stage"] == "collect"]
  assert all(r["tokens_per_s"] > 0 and r["mean_response_tokens"] > 0 for r in collect)
  evals = [r for r in records if r["stage"] == "evaluate" and not r.get("in_context")]
  assert [r["x"] for r in evals] == [0, 1, 2]
  for r in evals:
    assert 0 <= r["pass_rate"] <= 1 and r["mean_response_tokens"] > 0
  in_context = [r for r in records if r.get("in_context")]
  assert [(r["round"], r["step"]) for r in in_context] == [(0, 1), (0, 2), (1, 1), (1, 2)]
  summary = json.load(open(os.path.join(w, "summary.json")))
  assert summary["final_model"] == "round_001/model"
  if _tiny_config().ifeval.enabled:  # IF-Eval's data sits beside the checkout (as in CI).
    assert all(0 <= r["ifeval_prompt_level_strict"] <= 1 for r in evals)
    assert all("ifeval_prompt_level_strict" in e for e in summary["evaluations"])
    assert os.path.isfile(os.path.join(w, "round_001", "evaluation", "ifeval.json"))


def test_rounds_deploy_the_previous_rounds_model(tiny_run):
  from oel_jax.envs import load_trajectories
  w = tiny_run.workdir
  r0 = load_trajectories(os.path.join(w, "round_000", "trajectories", "extraction.jsonl"))
  r1 = load_trajectories(os.path.join(w, "round_001", "trajectories", "extraction.jsonl"))
  assert {t.model.round for t in r0} == {0} and {t.model.name for t in r0} == {"tiny"}
  assert {t.model.round for t in r1} == {1}
  assert {t.model.name for t in r1} == {os.path.join(w, "round_000", "model")}
  # Training boards differ per round; the held-out boards are the same every round.
  assert not {t.seed for t in r0} & {t.seed for t in r1}
  e0 = load_trajectories(os.path.join(w, "round_000", "evaluation", "games.jsonl"))
  e1 = load_trajectories(os.path.join(w, "round_001", "evaluation", "games.jsonl"))
  assert [t.seed for t in e0] == [t.seed for t in e1]
  assert not {t.seed for t in e0} & ({t.seed for t in r0} | {t.seed for t in r1})


def test_extraction_plays_are_different_games_and_run_k_reads_play_k(tiny_run):
  """configs/tiny.py: 2 boards x K=2 plays; each play is its own game, sampled with the
  evaluation settings, and extraction run k reads play k of every board."""
  from oel_jax.envs import load_trajectories
  from oel_jax.experience import load_knowledge_set
  folder = os.path.join(tiny_run.workdir, "round_000")
  pool = load_trajectories(os.path.join(folder, "trajectories", "extraction.jsonl"))
  assert [t.metadata["play"] for t in pool] == [0, 0, 1, 1]
  assert [t.seed for t in pool[:2]] == [t.seed for t in pool[2:]]
  for first, second in zip(pool[:2], pool[2:]):
    assert first.turns[0].prompt == second.turns[0].prompt
    assert first.turns[0].response != second.turns[0].response
  orders = load_knowledge_set(os.path.join(folder, "knowledge")).manifest["orders"]
  for k, order in enumerate(orders):
    assert {pool[i].metadata["play"] for i in order} == {k}
  # The pools' sampling settings: the official extraction (validate-mode) and deployment ones.
  sampling = {key: pool[0].metadata["sampling"][key] for key in ("temperature", "top_p", "top_k")}
  assert sampling == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
  consolidation = load_trajectories(os.path.join(folder, "trajectories", "consolidation.jsonl"))
  assert {(t.metadata["pool"], t.metadata["sampling"]["top_p"], t.metadata["sampling"]["top_k"])
          for t in consolidation} == {("consolidation", 1.0, 0)}


def test_export_loads_in_transformers_with_the_same_logits(tiny_run):
  import jax.numpy as jnp
  import torch
  import transformers

  from oel_jax.models import load_hf
  path = os.path.join(tiny_run.workdir, "round_001", "model")
  ours = load_hf(path)
  theirs = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  ids = tokenizer("You are on a frozen lake. [up] or [down]?")["input_ids"]
  with torch.no_grad():
    expected = theirs(torch.tensor([ids])).logits.numpy()
  got = np.asarray(ours(jnp.asarray([ids])))
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)
  # The consolidated weights differ from the initial tiny model's.
  from oel_jax import tiny
  initial = np.asarray(tiny.tiny_model()(jnp.asarray([ids])))
  assert np.abs(initial - got).max() > 1e-4


def _wait_then_kill(proc: subprocess.Popen, ready, what: str, timeout: float = 600) -> None:
  """SIGKILLs ``proc`` as soon as ``ready()`` holds (checked every 20 ms)."""
  deadline = time.monotonic() + timeout
  while not ready():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n"
                           f"{proc.stderr.read()[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL


def _extraction_step(workdir: str) -> int:
  path = os.path.join(workdir, "round_000", "knowledge", "extraction_state.json")
  try:
    with open(path) as f:
      return json.load(f)["step"]
  except (FileNotFoundError, json.JSONDecodeError):
    return 0


def _consolidation_checkpoint(workdir: str) -> bool:
  """Whether round 1's step-1 consolidation checkpoint is complete (orbax renames it last)."""
  return os.path.isdir(os.path.join(workdir, "round_001", "consolidation", "checkpoints", "1"))


def _tensors(path: str) -> dict:
  from safetensors.numpy import load_file
  return load_file(os.path.join(path, "model.safetensors"))


def test_killed_in_extraction_and_in_consolidation_resumes_to_the_same_result(
    tiny_run, tmp_path):
  workdir = str(tmp_path / "killed")
  command = main_command(f"--workdir={workdir}")

  def start():
    return subprocess.Popen(command, cwd=ROOT, env=main_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

  # Killed after the first of two extraction steps of round 0.
  _wait_then_kill(start(), lambda: _extraction_step(workdir) >= 1,
                  "round 0's first extraction step")
  assert not os.path.exists(os.path.join(workdir, "round_000", "extract.done.json"))
  # Restarted: extraction resumes at step 1; killed after round 1's first consolidation step.
  _wait_then_kill(start(), lambda: _consolidation_checkpoint(workdir),
                  "round 1's first consolidation checkpoint")
  assert not os.path.exists(os.path.join(workdir, "round_001", "consolidate.done.json"))
  first = json.load(open(os.path.join(workdir, "round_000", "extract.done.json")))
  assert first["metrics"]["steps"][0]["step"] == 1
  # Restarted again: finishes.
  proc = start()
  _, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  assert "consolidation: resuming from step 1" in err

  ref = tiny_run.workdir
  got = [metrics.deterministic(r) for r in metrics.read_jsonl(os.path.join(workdir,
                                                                           "metrics.jsonl"))]
  want = [metrics.deterministic(r) for r in metrics.read_jsonl(os.path.join(ref,
                                                                            "metrics.jsonl"))]
  assert got == want
  for r in ("round_000", "round_001"):
    for name in ("trajectories/extraction.jsonl", "trajectories/consolidation.jsonl",
                 "knowledge/knowledge_0.txt", "knowledge/knowledge_1.txt"):
      with open(os.path.join(workdir, r, name), "rb") as a, \
          open(os.path.join(ref, r, name), "rb") as b:
        # Round 1's games name the deployed model by its path in the workdir.
        assert a.read().replace(workdir.encode(), b"W") == \
            b.read().replace(ref.encode(), b"W"), f"{r}/{name} differs"
    a, b = _tensors(os.path.join(workdir, r, "model")), _tensors(os.path.join(ref, r, "model"))
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{r} {key}")


# ---- config checks (in process, no model loaded) ----


def _errors(config, num_devices=1) -> str:
  with pytest.raises(loop.ConfigError) as e:
    loop.plan(config, num_devices=num_devices)
  return str(e.value)


def test_config_errors_name_the_field():
  c = _tiny_config()
  c.train.k = 4096
  c.env = "chess"
  c.consolidation.games_per_step = 3
  c.train.micro_batches = 1
  message = _errors(c, num_devices=2)
  assert "config.train.k (4096) exceeds the model's vocabulary (2048 rows)" in message
  assert "config.env must be one of ('frozenlake', 'sokoban'), got 'chess'" in message
  # A step's rows are padded up to the mesh: its games need not divide by the devices.
  assert "games_per_step" not in message

  c = _tiny_config()
  c.extraction.num_runs = 0
  c.mesh.tp = 3
  c.max_seq_len = 40
  message = _errors(c, num_devices=2)
  assert "config.extraction.num_runs must be an integer >= 1, got 0" in message
  assert "config.mesh" in message and "2 devices do not divide" in message
  assert "config.rollout.max_new_tokens (48) leaves no room for a prompt in " \
         "config.max_seq_len (40)" in message

  c = _tiny_config()
  c.collect.extraction_plays = 1  # 2 boards x 1 play < n x K = 4 for pool_order "chunks"
  c.ifeval.enabled = True
  c.ifeval.path = "/nonexistent/input_data.jsonl"
  c.model = "/nonexistent/Qwen3-4B"
  c.consolidation.temperature = 0.5
  message = _errors(c)
  assert "config.extraction.pool_order 'chunks' needs" in message
  assert "config.ifeval.path: '/nonexistent/input_data.jsonl' is not a file" in message
  assert "config.model: '/nonexistent/Qwen3-4B' is neither 'tiny' nor a checkpoint" in message
  assert "config.consolidation.temperature (0.5) differs from config.train.temperature" in message


def test_the_tiny_config_is_valid():
  p = loop.plan(_tiny_config(), num_devices=1)
  assert p.mesh_shape == {"data": 1, "fsdp": 1, "tp": 1}
  assert (p.extraction_boards, p.extraction_plays, p.consolidation_games) == (2, 2, 4)
  assert p.extraction_for(0).seed != p.extraction_for(1).seed
  assert p.extraction_for(1) == p.extraction_for(1)


def test_a_workdir_refuses_another_config(tmp_path):
  run = loop.OnlineLoop(_tiny_config(), str(tmp_path), num_devices=1)
  run.check_workdir()
  c = _tiny_config()
  c.rounds = 5  # may change: the run goes on for more rounds
  loop.OnlineLoop(c, str(tmp_path), num_devices=1).check_workdir()
  c.train.learning_rate = 0.5
  with pytest.raises(loop.ConfigError, match=r"train.learning_rate: 0.0001 -> 0.5"):
    loop.OnlineLoop(c, str(tmp_path), num_devices=1).check_workdir()


def test_a_stage_needs_the_stages_before_it(tmp_path):
  run = loop.OnlineLoop(_tiny_config(), str(tmp_path), num_devices=1)
  run.check_workdir()
  with pytest.raises(RuntimeError, match=r"round 0: stage 'collect' has not completed"):
    run.run_stage("extract", 0)
  with pytest.raises(RuntimeError, match=r"round 0: stage 'consolidate' has not completed"):
    run.run_stage("collect", 1)


def test_the_loop_serves_scripts_the_run_s_models_and_paths(tmp_path):
  """What scripts/demo_experiments.py and main.py's probe call on a loop, in process."""
  run = loop.OnlineLoop(_tiny_config(), str(tmp_path), num_devices=1)
  assert run.workdir == str(tmp_path) and run.files.path == run.workdir
  assert run.deployed_path(0) == "tiny"
  assert run.deployed_path(2) == os.path.join(str(tmp_path), "round_001", "model")
  assert run.plan.evaluation.num_games == 8
  sampler = run.sampler("tiny")
  assert run.sampler(run.deployed_path(0)) is sampler
  assert run.load_model("tiny") is run.load_model(run.config.model)
  assert run.tokenizer() is run.pool.tokenizer()
  assert not run.done(0, "collect") and run.markers() == []
