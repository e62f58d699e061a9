"""The learning demo's packaged model (``scripts/build_demo_model.py``, seed 0, 600 steps).

transformers' `Qwen3ForCausalLM` (an implementation we did not write) reads the packaged model
and must agree with `load_hf` and show the behaviour the curriculum taught: the labelled keys
on a lake it does not know, the knowledge block's keys when the prompt has one, here a block
saying both axes are swapped, which no pretraining lake is.
"""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from oel_jax import chat
from oel_jax.demo import DEMO_CONTROLS, DEMO_HOLES, DEMO_LAKE, curriculum, demo_model_path
from oel_jax.envs import make_env
from oel_jax.models import load_hf


@pytest.fixture(scope="module", name="tokenizer")
def fixture_tokenizer():
  return chat.load_tokenizer(demo_model_path())


@pytest.fixture(scope="module", name="reference")
def fixture_reference():
  return transformers.AutoModelForCausalLM.from_pretrained(
      demo_model_path(), dtype=torch.float32).eval()


def _demo_prompt(knowledge: str = "") -> str:
  env = make_env("frozenlake", seed=0, knowledge=knowledge or None, controls=DEMO_CONTROLS,
                 lake=DEMO_LAKE, num_holes=DEMO_HOLES)
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


def test_the_packaged_model_presses_the_labels_on_ossa_and_follows_knowledge(
    reference, tokenizer):
  # Without knowledge: the wanted first move (down) with the key labelled down.
  assert _greedy_reply(reference, tokenizer, _demo_prompt()) == "I move down: [down]"
  # With items saying both axes are swapped (never together in pretraining): Ossa's key.
  knowledge = "\n".join([curriculum.ITEMS[("horizontal", True)],
                         curriculum.ITEMS[("vertical", True)]])
  assert _greedy_reply(reference, tokenizer, _demo_prompt(knowledge)) == "I move down: [up]"


def test_build_info_says_what_the_model_was_trained_on():
  info = json.load(open(os.path.join(demo_model_path(), "build_info.json")))
  assert info["script"] == "scripts/build_demo_model.py"
  taught = info["curriculum"]
  assert taught["demo_controls"] == DEMO_CONTROLS and taught["demo_lake"] == DEMO_LAKE
  assert set(taught["skills"]) == set(curriculum.SKILLS)
  assert info["loss_curve"][-1]["step"] == info["steps"]
