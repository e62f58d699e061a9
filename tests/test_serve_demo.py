"""End to end on the learning demo's world: a deployment served through the OpenAI API learns.

A scripted user plays lake Ossa through the official ``openai`` client against ``python -m
oel_jax.serve`` serving the demo model (`oel_jax.envs.api_play`); the server's log up to a
cut-off feeds one round of the ordinary loop (``collect.source = "files"``); the round's
model is hot-swapped into the running server (``/admin/reload``), and the same held-out games
are played again. The held-out pass rate must rise by the demo's own margins
(`test_demo.PASS_RATE_MARGIN`, `test_demo.KEY_MARGIN`).
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

# pylint: disable=wrong-import-position
import tiny_loop_run
from oel_jax.demo import DEMO_WORLD, demo_config_path, demo_model_path
from oel_jax.envs import ApiSampling, play_through_api
from oel_jax.trajectories import read_served
from processes import free_port
from test_demo import FIRST_MOVE, KEY_MARGIN, PASS_RATE_MARGIN

DEPLOYED_GAMES = range(10_000, 10_032)
"""The boards the deployment's users play (the round's experience)."""

HELD_OUT = range(20_000, 20_024)
"""The boards of the before/after comparison (never in the experience)."""

DEPLOYMENT = ApiSampling(temperature=1.0, max_tokens=16)
"""The users' games sample the model's own distribution (as the demo's extraction games do)."""

EVALUATION = ApiSampling(temperature=0.7, top_p=0.8, max_tokens=16)
"""Held-out play: the demo's evaluation settings (less top-k 20, which OpenAI has no name for)."""


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if server.poll() is not None:
      raise RuntimeError(f"the server exited with {server.returncode}")
    try:
      with urllib.request.urlopen(url + "/v1/models", timeout=5):
        return
    except OSError:
      time.sleep(1)
  raise TimeoutError("the server did not come up")


def _scores(games) -> tuple[float, float]:
  return (sum(g.outcome.success for g in games) / len(games),
          sum(g.turns[0].action == FIRST_MOVE for g in games) / len(games))


def test_a_served_model_learns_from_its_recorded_games(tmp_path):
  serve_dir, run_dir = str(tmp_path / "serve"), str(tmp_path / "run")
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path / "server.log", "w")
  server = subprocess.Popen(
      [sys.executable, "-m", "oel_jax.serve", "--model", demo_model_path(), "--workdir",
       serve_dir, "--round", "0", "--port", str(port), "--served_model_name", "demo",
       "--thinking", "off", "--max_tokens", "16"],
      cwd=tiny_loop_run.ROOT, env=tiny_loop_run.main_env(), stdout=log,
      stderr=subprocess.STDOUT)
  try:
    _wait_until_up(url, server)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    deployed = play_through_api(client, "frozenlake", DEMO_WORLD.settings(), DEPLOYED_GAMES,
                                model="demo", sampling=DEPLOYMENT)
    cut = time.time()
    time.sleep(0.05)
    before = play_through_api(client, "frozenlake", DEMO_WORLD.settings(), HELD_OUT,
                              model="demo", sampling=EVALUATION, conversation_prefix="before",
                              feedback=False, request_seed=1)
    recorded = read_served(serve_dir, until=cut)
    assert len(recorded) == len(deployed)  # one trajectory per game; held-out play is later
    assert [t.turns[0].prompt_format for t in recorded] == ["oel_game"] * len(deployed)
    # Games run on several threads, so the log's order is not the seeds'.
    assert ({t.metadata["conversation_id"]: t.outcome.success for t in recorded}
            == {g.metadata["conversation_id"]: g.outcome.success for g in deployed})

    process = tiny_loop_run.run_main(
        f"--config={demo_config_path()}", f"--workdir={run_dir}",
        "--config.collect.source=files", "--config.collect.trajectory_files=",
        f"--config.collect.served_workdir={serve_dir}", f"--config.collect.served_until={cut}",
        "--config.extraction.pool_order=shuffle", "--config.evaluation.games=False",
        "--config.evaluation.initial=False", "--config.evaluation.in_context=False")
    assert process.returncode == 0, process.stderr[-3000:]

    request = urllib.request.Request(
        url + "/admin/reload", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": os.path.join(run_dir, "round_000", "model"),
                         "round": 1}).encode())
    with urllib.request.urlopen(request, timeout=300) as response:
      assert response.status == 200
    after = play_through_api(client, "frozenlake", DEMO_WORLD.settings(), HELD_OUT,
                             model="demo", sampling=EVALUATION, conversation_prefix="after",
                             feedback=False, request_seed=1)
  finally:
    server.terminate()
    server.wait(timeout=60)
    log.close()
  (pass_before, key_before), (pass_after, key_after) = _scores(before), _scores(after)
  print(f"held-out pass rate {pass_before:.3f} -> {pass_after:.3f}; first move {FIRST_MOVE} "
        f"{key_before:.3f} -> {key_after:.3f}")
  assert pass_after - pass_before >= PASS_RATE_MARGIN, (pass_before, pass_after)
  assert key_after - key_before >= KEY_MARGIN, (key_before, key_after)
  served = [json.loads(line) for line in open(os.path.join(serve_dir, "served.jsonl"))]
  rounds = {r["metadata"]["conversation_id"].split("-")[0]: r["model"]["round"] for r in served}
  assert rounds == {"game": 0, "before": 0, "after": 1}
