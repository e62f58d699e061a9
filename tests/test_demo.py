"""The learning demo: its packaged model, and the README's main job learning with it.

transformers' `Qwen3ForCausalLM` (an implementation we did not write) reads the packaged model
(``scripts/build_demo_model.py``, seed 0, 600 steps) and must agree with `load_hf` and show the
behaviour the curriculum taught: down first on a lake it knows nothing about, and the first
move a knowledge block's items call for when the prompt has one.

The run is the demo shortened (`tiny_loop_run.SHORT_DEMO`) through the CLI, as the README runs
it: the held-out pass rate must rise by `PASS_RATE_MARGIN` and the share of first moves to
the right by `KEY_MARGIN`, which a loss that does not move the weights, a loss of the wrong
sign, a teacher without knowledge or a sampler that ignores the weight swap does not reach
(``scripts/demo_failure_checks.py`` runs each; results in docs/benchmarks.md).
"""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import tiny_loop_run
from oel_jax import chat
from oel_jax.demo import DEMO_LAKE, DEMO_THIN_ICE, curriculum, demo_model_path
from oel_jax.envs import load_trajectories, make_env
from oel_jax.models import load_hf

PASS_RATE_MARGIN = 6 / 24
"""Least rise of the held-out pass rate from the initial model (which wins no game on Ossa) to
the last round's: six of the 24 games. Over seeds 0-4 the full demo rose by 0.59 to 1.00;
with each break of ``scripts/demo_failure_checks.py`` it rose by 0."""

KEY_MARGIN = 0.5
"""Least rise of the share of held-out games whose first move is ``[right]``, the move every
round-0 knowledge text of the demo calls for (the initial model moves down first)."""

FIRST_MOVE = "[right]"
"""The safe first move on lake Ossa (its left column is thin ice)."""


@pytest.fixture(scope="module", name="tokenizer")
def fixture_tokenizer():
  return chat.load_tokenizer(demo_model_path())


@pytest.fixture(scope="module", name="reference")
def fixture_reference():
  return transformers.AutoModelForCausalLM.from_pretrained(
      demo_model_path(), dtype=torch.float32).eval()


def _demo_prompt(knowledge: str = "") -> str:
  env = make_env("frozenlake", seed=0, knowledge=knowledge or None,
                 **curriculum.DEMO_WORLD.settings())
  return env.reset()


def _greedy_reply(reference, tokenizer, prompt: str) -> str:
  ids = chat.encode_chat(tokenizer, [{"role": "user", "content": prompt}],
                         enable_thinking=False)
  with torch.no_grad():
    out = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                             eos_token_id=chat.stop_token_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
  return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_load_hf_and_transformers_read_the_packaged_model_alike(reference, tokenizer):
  ours = load_hf(demo_model_path())
  ids = chat.encode_chat(tokenizer, [{"role": "user", "content": _demo_prompt()}],
                         enable_thinking=False)
  mine = np.asarray(ours(np.asarray([ids], np.int32)))
  with torch.no_grad():
    theirs = reference(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)


def test_the_packaged_model_moves_down_first_on_ossa_unless_knowledge_says_otherwise(
    reference, tokenizer):
  # Without knowledge: the staircase's first move, through Ossa's thin ice.
  assert _greedy_reply(reference, tokenizer, _demo_prompt()) == "I move down: [down]"
  # With items saying the left column is thin (and one saying the opposite): right first.
  column, row = curriculum.ITEMS["column"], curriculum.ITEMS["row"]
  knowledge = "\n".join([column, curriculum.GENERIC_ITEM, column, row, column])
  assert _greedy_reply(reference, tokenizer, _demo_prompt(knowledge)) == "I move right: [right]"
  knowledge = "\n".join([row, column, row, row])
  assert _greedy_reply(reference, tokenizer, _demo_prompt(knowledge)) == "I move down: [down]"


def test_build_info_says_what_the_model_was_trained_on():
  info = json.load(open(os.path.join(demo_model_path(), "build_info.json")))
  assert info["script"] == "scripts/build_demo_model.py"
  taught = info["curriculum"]
  assert taught["demo_thin_ice"] == [list(c) for c in DEMO_THIN_ICE]
  assert taught["demo_lake"] == DEMO_LAKE
  assert set(taught["skills"]) == set(curriculum.SKILLS)
  assert info["loss_curve"][-1]["step"] == info["steps"]


def _first_move_share(games_file: str, key: str) -> float:
  games = load_trajectories(games_file)
  return sum(g.turns[0].action == key for g in games) / len(games)


def test_the_shortened_demo_learns_from_its_own_experience(tmp_path_factory):
  run = tiny_loop_run.short_demo(tmp_path_factory)
  assert run.process.returncode == 0, run.process.stderr[-3000:]
  with open(os.path.join(run.workdir, "summary.json")) as f:
    evaluations = json.load(f)["evaluations"]
  assert [e["round"] for e in evaluations] == ["initial", 0], evaluations
  rise = evaluations[-1]["pass_rate"] - evaluations[0]["pass_rate"]
  assert rise >= PASS_RATE_MARGIN, evaluations
  before, after = (_first_move_share(os.path.join(run.workdir, d, "evaluation", "games.jsonl"),
                                     FIRST_MOVE) for d in ("initial", "round_000"))
  assert after - before >= KEY_MARGIN, (before, after)
  assert "plot: " in run.process.stdout and "round 0: pass rate" in run.process.stdout
