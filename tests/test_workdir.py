"""oel_jax.workdir (paths, done-files, reports) and oel_jax.model_pool (weights synced into
the one sampler per architecture), in process with the tiny model."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oel_jax import config as config_lib
from oel_jax.model_pool import ModelPool
from oel_jax.workdir import DONE_FILE, INITIAL, STAGES, Workdir


def _config(**changes):
  c = config_lib.default_config()
  c.model = "tiny"
  c.rounds = 2
  c.logging.tensorboard = False
  c.logging.plot = False
  for key, value in changes.items():
    setattr(c, key, value)
  run, errors = config_lib.parse(c)
  assert not errors, errors
  return run


def test_paths_and_deployed_models(tmp_path):
  w = Workdir(str(tmp_path), _config())
  assert w.round_dir(INITIAL) == os.path.join(str(tmp_path), "initial")
  assert w.round_dir(3) == os.path.join(str(tmp_path), "round_003")
  assert w.deployed_path(0) == "tiny"
  assert w.deployed_path(2) == os.path.join(str(tmp_path), "round_001", "model")
  assert w.done_path(0, "collect") == os.path.join(str(tmp_path), "round_000",
                                                   DONE_FILE.format("collect"))


def test_done_files_drive_the_reports(tmp_path):
  w = Workdir(str(tmp_path), _config())
  w.record_config()
  assert not w.done(0, "extract")
  with pytest.raises(RuntimeError, match=r"round 0: stage 'collect' has not completed"):
    w.require(0, "collect")
  extracted = {"steps": [], "runs": 1, "mean_knowledge_tokens": 0.0, "empty_extractions": 0}
  exported = {"dtype": "float32", "files": [], "bytes": 0}
  artifact = os.path.join(w.round_dir(0), "knowledge")
  record = w.finish(0, "extract", time.perf_counter(), extracted, {"knowledge": artifact})
  assert w.done(0, "extract") and w.marker(0, "extract") == record
  assert record["artifacts"] == {"knowledge": "round_000/knowledge"}
  w.require(0, "extract")
  # A later round's done-file is listed after an earlier one's, whatever the write order.
  w.finish(1, "extract", time.perf_counter(), extracted, {})
  w.finish(0, "export", time.perf_counter(), exported, {"export": w.model_dir(0)})
  assert [(m["round"], m["stage"]) for m in w.markers()] == [
      (0, "extract"), (0, "export"), (1, "extract")]
  assert all(m["stage"] in STAGES for m in w.markers())
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    assert [(r["round"], r["stage"]) for r in map(json.loads, f)] == [
        (0, "extract"), (0, "export"), (1, "extract")]
  assert w.summary() == json.load(open(os.path.join(str(tmp_path), "summary.json")))
  assert w.summary()["final_model"] == "round_000/model"


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_sampler_always_holds_the_weights_asked_for():
  """Whoever used the sampler last (consolidation swaps a student in), asking for a model by
  path gives its weights, in the same sampler (compiled programs kept)."""
  pool = ModelPool(_config(), {"data": 1, "fsdp": 1, "tp": 1})
  model = pool.load("tiny")
  assert pool.load("tiny") is model
  sampler = pool.sampler("tiny")
  prompt = [[1, 2, 3, 4]]
  first = sampler.generate(prompt, max_new_tokens=4, temperature=0.0).tokens
  state = nnx.state(model)
  other = jax.tree.map(lambda x: x * 1.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  sampler.update_weights(other)  # what consolidation does with the student's weights
  held = _leaves(sampler._params)  # pylint: disable=protected-access
  assert any(not np.array_equal(a, b) for a, b in zip(held, _leaves(state)))
  again = pool.sampler("tiny")
  assert again is sampler
  for got, want in zip(_leaves(again._params), _leaves(state)):  # pylint: disable=protected-access
    np.testing.assert_array_equal(got, want)
  assert again.generate(prompt, max_new_tokens=4, temperature=0.0).tokens == first
