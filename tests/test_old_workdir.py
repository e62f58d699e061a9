"""A run folder written before issue 13's redesign resumes with today's code.

``tests/data/workdir_6084ea9/`` was written by commit 6084ea9 (the last commit before the
config tree, the `Workdir` and the stage modules) running

    python -m oel_jax.main --config=configs/tiny.py --workdir=... --config.rounds=1 \\
        --config.progress=False

with ``OEL_IFEVAL_PATH`` set, to the end of round 0. It keeps the files that carry a format:
config.json (0 for unset optional integers), metrics.jsonl, summary.json, every done-file,
both trajectory files, the knowledge set and the extraction state, the consolidation
metrics and the metadata of its last orbax checkpoint (``checkpoint_2_meta.json``, its
``meta/metadata``); no weights, no orbax state, no tensorboard events, no plot.

Checked by hand against the full folder: today's ``main`` with the same command skips every
stage and rebuilds the same metrics.jsonl; with ``--config.rounds=2`` it plays round 1 from
the old round 0's model, with the losses commit 6084ea9 gets for round 1; and with round 0's
consolidate done-file removed it resumes from the old orbax checkpoint and writes a
byte-identical model.safetensors. These tests keep the file-format half of that.
"""

import json
import os
import shutil

import pytest

from oel_jax import loop
from oel_jax.config import RunConfig
from oel_jax.consolidate import checkpoints
from oel_jax.consolidate import run as consolidation_run
from oel_jax.envs import load_trajectories
from oel_jax.experience import load_knowledge_set, load_state, pool_digest
from oel_jax.metrics import read_jsonl
from oel_jax.model_pool import ModelPool
from oel_jax.workdir import CONFIG_FILE, METRICS_FILE, STAGES, SUMMARY_FILE, Workdir, read_json

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "workdir_6084ea9")


@pytest.fixture(name="old")
def _old(tmp_path):
  """A copy of the old run folder, its IF-Eval path (the machine's it ran on) pointed at a
  file here, and its config as today's code reads it."""
  path = str(tmp_path / "run")
  shutil.copytree(FIXTURE, path)
  data = read_json(os.path.join(path, CONFIG_FILE))
  assert data["rollout"]["max_batch_size"] == 0  # the old record of "unset"
  (tmp_path / "ifeval.jsonl").write_text("{}\n")
  data["ifeval"]["path"] = str(tmp_path / "ifeval.jsonl")
  data["logging"]["plot"] = False  # a setting a resumed run may change
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(data, f)
  return path, RunConfig.from_dict(data)


def test_the_loop_finds_every_stage_done_and_reports_what_the_old_run_did(old, monkeypatch):
  path, config = old
  assert config.rounds == 1 and config.rollout.max_batch_size is None

  def not_again(round_, *args):
    raise AssertionError(f"round {round_}: a finished stage ran again")

  monkeypatch.setattr(loop, "RUNNERS", {stage: not_again for stage in STAGES})
  run = loop.OnlineLoop(config, path, num_devices=1)
  summary = run.run()
  assert summary == read_json(os.path.join(FIXTURE, SUMMARY_FILE))
  assert read_jsonl(os.path.join(path, METRICS_FILE)) == \
      read_jsonl(os.path.join(FIXTURE, METRICS_FILE))
  # config.json is rewritten the way today's code records it, and still matches.
  assert read_json(os.path.join(path, CONFIG_FILE))["rollout"]["max_batch_size"] is None
  Workdir(path, config).record_config()


def test_an_interrupted_extraction_would_resume_from_the_old_state(old):
  path, config = old
  folder = os.path.join(path, "round_000")
  state = load_state(os.path.join(folder, "knowledge", "extraction_state.json"))
  pool = load_trajectories(os.path.join(folder, "trajectories", "extraction.jsonl"))
  # What `run_extraction` compares before it resumes.
  assert state.config == config.extraction_for(0)
  assert (state.pool_size, state.pool_digest) == (len(pool), pool_digest(pool))
  assert state.step == 2 and state.done
  assert list(load_knowledge_set(os.path.join(folder, "knowledge")).texts) == \
      list(state.knowledge)


class _OldCheckpoints:
  """The old checkpoint's metadata behind `checkpoints.restore`'s interface (no state)."""

  folder = FIXTURE

  def __init__(self, meta):
    self.meta = meta

  def latest_step(self):
    return 2

  def read_meta(self, step):
    assert step == 2
    return self.meta

  def restore_state(self, step, abstract):
    del step
    return abstract


def test_an_interrupted_consolidation_would_resume_from_the_old_checkpoint(old):
  """Today's fingerprint of the old inputs (settings, model, rendered prompts, knowledge) is
  the one the old checkpoint recorded, so `restore` accepts it."""
  path, config = old
  folder = os.path.join(path, "round_000")
  meta = read_json(os.path.join(folder, "consolidation", "checkpoint_2_meta.json"))
  consolidation = config.consolidation_for(0)
  pool = ModelPool(config, {"data": 1, "fsdp": 1, "tp": 1})
  model = pool.load(config.model)  # random weights: the fingerprint holds the architecture
  data = consolidation_run._inputs(  # pylint: disable=protected-access
      model, model, pool.tokenizer(),
      load_trajectories(os.path.join(folder, "trajectories", "consolidation.jsonl")),
      load_knowledge_set(os.path.join(folder, "knowledge")).texts, consolidation)
  fingerprint = data.fingerprint
  state, history, step = checkpoints.restore(_OldCheckpoints(meta), fingerprint, consolidation,
                                             lambda: "abstract state")
  assert (state, step) == ("abstract state", 2)
  assert history == read_jsonl(os.path.join(folder, "consolidation", "metrics.jsonl"))
  # And a real difference is still refused, by name.
  with pytest.raises(ValueError, match="differing: knowledge"):
    checkpoints.restore(_OldCheckpoints(meta), {**fingerprint, "knowledge": "other"},
                        consolidation, lambda: None)
