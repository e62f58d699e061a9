"""Stage 3 of a round: the knowledge distilled into the deployed model's weights.

On-policy context distillation (`oel_jax.consolidate.run_consolidation`, orbax checkpoints in
``consolidation/``, resumable inside itself): a copy of the deployed model answers the
consolidation games' prefixes and is trained towards the frozen deployed model reading the
same prefixes with a knowledge text in its prompt. With ``consolidation.context
"raw_trajectories"`` (a baseline) the contexts are extraction games instead of knowledge.

Writes ``model/``, a Hugging Face checkpoint with the tokenizer: the model the next round
deploys.
"""

from __future__ import annotations

import os
import time
from typing import Any

from oel_jax import consolidate as consolidation_lib
from oel_jax import metrics as metrics_lib
from oel_jax.atomic_write import replace_folder
from oel_jax.config import RunConfig
from oel_jax.envs import load_trajectories
from oel_jax.experience import load_knowledge_set
from oel_jax.model_pool import ModelPool
from oel_jax.models import save_hf
from oel_jax.workdir import Workdir


def _contexts(round_: int, config: RunConfig, workdir: Workdir, pool: ModelPool) -> list[str]:
  folder = workdir.round_dir(round_)
  consolidation = config.consolidation_for(round_)
  if consolidation.context == "raw_trajectories":
    return list(consolidation_lib.raw_trajectory_contexts(
        load_trajectories(os.path.join(folder, "trajectories", "extraction.jsonl")),
        pool.tokenizer(), num_contexts=config.extraction.num_runs,
        max_tokens=config.extraction.max_knowledge_tokens, seed=consolidation.seed))
  return list(load_knowledge_set(os.path.join(folder, "knowledge")).texts)


def run(round_: int, config: RunConfig, workdir: Workdir, pool: ModelPool) -> dict[str, Any]:
  """Consolidates the round's knowledge into the deployed model; writes ``model/``.

  Returns:
    The stage's done-file record.
  """
  workdir.require(round_, "collect")
  workdir.require(round_, "extract")
  start = time.perf_counter()
  folder = workdir.round_dir(round_)
  trajectories = load_trajectories(os.path.join(folder, "trajectories", "consolidation.jsonl"))
  contexts = _contexts(round_, config, workdir, pool)
  consolidation = config.consolidation_for(round_)
  deployed = workdir.deployed_path(round_)
  sampler = pool.sampler(deployed)
  # The round-start model is both the student's starting point and the frozen teacher
  # (run_consolidation trains a copy and writes neither); the sampler gets the student's
  # weights while it trains, and the deployed ones back the next time it is asked for.
  model = pool.load(deployed)
  result = consolidation_lib.run_consolidation(
      model, model, pool.tokenizer(), trajectories, contexts, consolidation,
      workdir=os.path.join(folder, "consolidation"), mesh=pool.mesh(), sampler=sampler,
      trainer=pool.trainer(model, consolidation.train), progress=bool(config.progress))
  out = replace_folder(workdir.model_dir(round_),
                       lambda tmp: save_hf(result.model, tmp, tokenizer=pool.tokenizer()))
  metrics = metrics_lib.consolidation_stats(result)
  del result
  return workdir.finish(round_, "consolidate", start, metrics, {"model": out})
