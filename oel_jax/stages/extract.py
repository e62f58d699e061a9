"""Stage 2 of a round: knowledge extracted from the round's extraction games.

The deployed model (or ``config.extraction.model``, a baseline's extractor with its own
tokenizer) runs K accumulation runs over the extraction pool
(`oel_jax.experience.run_extraction`, which resumes inside itself from its state file).

Writes ``knowledge/``: ``knowledge_{k}.txt``, ``manifest.json`` and the snapshots.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from tqdm.auto import tqdm

from oel_jax import metrics as metrics_lib
from oel_jax.config import RunConfig
from oel_jax.envs import load_trajectories
from oel_jax.experience import STATE_FILE, load_state, run_extraction
from oel_jax.model_pool import ModelPool
from oel_jax.workdir import Workdir

_log = logging.getLogger(__name__)


def run(round_: int, config: RunConfig, workdir: Workdir, pool: ModelPool) -> dict[str, Any]:
  """Extracts the round's knowledge set (resumes an interrupted extraction).

  Returns:
    The stage's done-file record.
  """
  workdir.require(round_, "collect")
  start = time.perf_counter()
  folder = workdir.round_dir(round_)
  games = load_trajectories(os.path.join(folder, "trajectories", "extraction.jsonl"))
  extraction = config.extraction_for(round_)
  out_dir = os.path.join(folder, "knowledge")
  done = 0
  state_path = os.path.join(out_dir, STATE_FILE)
  if os.path.exists(state_path):
    done = load_state(state_path).step
    _log.info("round %d: extraction resumes at step %d of %d", round_, done,
              extraction.num_trajectories)
  other = config.extraction.model
  extractor = other or workdir.deployed_path(round_)
  tokenizer = pool.tokenizer(other) if other else pool.tokenizer()
  bar = tqdm(total=extraction.num_trajectories, initial=done, unit="step",
             desc=f"round {round_} extraction (K={extraction.num_runs})",
             disable=not config.progress, leave=False)
  try:
    state = run_extraction(games, extraction, tokenizer=tokenizer,
                           sampler=pool.sampler(extractor, tokenizer), out_dir=out_dir,
                           on_step=lambda s: bar.update(1))
  finally:
    bar.close()
  metrics = metrics_lib.extraction_stats(state)
  return workdir.finish(round_, "extract", start, metrics, {"knowledge": out_dir})
