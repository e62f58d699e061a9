"""Stage 4 of a round: the consolidated model on the held-out maps.

Pass rate and response length of ``model/`` (``evaluation/pass_rate.json``, the games in
``evaluation/games.jsonl``), optionally IF-Eval (``evaluation/ifeval.json``) and the in-context
pass rate of the round-start model with the knowledge in its prompt, after each extraction
snapshot (``evaluation/in_context.json``). Round `INITIAL` evaluates the config's model the
same way, before round 0, so that the plot starts from the model as it was.

What is evaluated is what the config names: the held-out games of ``config.env`` when
``config.evaluation.games`` (default), IF-Eval when ``config.ifeval.enabled``; with neither
(e.g. a deployment's recorded conversations, which have no game to play), the stage loads no
model and records empty metrics, and the run's reports (summary.json, metrics.jsonl, the plot)
simply hold no evaluation.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from oel_jax.config import RunConfig
from oel_jax.envs import ModelInfo
from oel_jax.evaluate import evaluate
from oel_jax.experience import SNAPSHOT_DIR, load_knowledge_set
from oel_jax.ifeval import evaluate_ifeval
from oel_jax.model_pool import ModelPool
from oel_jax.workdir import INITIAL, Round, Workdir, write_json


def run(round_: Round, config: RunConfig, workdir: Workdir, pool: ModelPool) -> dict[str, Any]:
  """Evaluates the round's consolidated model (or the initial model for `INITIAL`).

  Returns:
    The stage's done-file record.
  """
  start = time.perf_counter()
  out = os.path.join(workdir.round_dir(round_), "evaluation")
  os.makedirs(out, exist_ok=True)
  artifacts: dict[str, str] = {}
  metrics: dict[str, Any] = {}
  if round_ == INITIAL:
    path, info = config.model, ModelInfo(str(config.model), 0)
  else:
    workdir.require(round_, "consolidate")
    path = workdir.model_dir(int(round_))
    info = ModelInfo(path, int(round_) + 1)
    if config.evaluation.in_context:
      metrics["in_context"] = _in_context(int(round_), config, workdir, pool, out)
      artifacts["in_context"] = os.path.join(out, "in_context.json")
  if config.evaluation.games:
    result = evaluate(pool.sampler(path), pool.tokenizer(), config.evaluation_config(),
                      model=info, trajectory_path=os.path.join(out, "games.jsonl"))
    write_json(os.path.join(out, "pass_rate.json"), result.to_dict())
    metrics["pass_rate"] = result.to_dict()
    artifacts.update(pass_rate=os.path.join(out, "pass_rate.json"),
                     games=os.path.join(out, "games.jsonl"))
  if config.ifeval.enabled:
    metrics["ifeval"] = _ifeval(path, config, pool, out)
    artifacts["ifeval"] = os.path.join(out, "ifeval.json")
  return workdir.finish(round_, "evaluate", start, metrics, artifacts)


def _in_context(round_: int, config: RunConfig, workdir: Workdir, pool: ModelPool,
                out: str) -> list[dict[str, Any]]:
  """Pass rate of the round-start model with the knowledge of each extraction snapshot."""
  folder = workdir.round_dir(round_)
  extraction = config.extraction_for(round_)
  n, every = extraction.num_trajectories, extraction.snapshot_every
  steps = list(range(every, n, every)) if every else []
  sets = [(s, os.path.join(folder, "knowledge", SNAPSHOT_DIR.format(s))) for s in steps]
  sets.append((n, os.path.join(folder, "knowledge")))
  knowledge_run = int(config.evaluation.in_context_run)
  deployed = workdir.deployed_path(round_)
  sampler = pool.sampler(deployed)
  records = []
  for step, knowledge_dir in sets:
    text = load_knowledge_set(knowledge_dir).texts[knowledge_run]
    result = evaluate(sampler, pool.tokenizer(), config.evaluation_config(),
                      model=ModelInfo(str(deployed), round_), knowledge=text)
    records.append({"step": step, "num_trajectories": n, "knowledge_run": knowledge_run,
                    **result.to_dict()})
  write_json(os.path.join(out, "in_context.json"), records)
  return records


def _ifeval(path: str, config: RunConfig, pool: ModelPool, out: str) -> dict[str, Any]:
  """IF-Eval scores of the model at ``path`` (``evaluation/ifeval.json`` holds the replies)."""
  c = config.ifeval
  params = c.sampling_params
  result = evaluate_ifeval(
      pool.sampler(path), pool.tokenizer(), path=c.path, enable_thinking=params.enable_thinking,
      limit=c.limit or None, batch_size=c.batch_size, seed=c.seed, **params.generate_kwargs())
  data = result.to_dict() if hasattr(result, "to_dict") else dataclasses.asdict(result)
  write_json(os.path.join(out, "ifeval.json"), data)
  s = result.scores
  return {"prompt_level_strict": s.prompt_level_strict,
          "prompt_level_loose": s.prompt_level_loose,
          "instruction_level_strict": s.instruction_level_strict,
          "instruction_level_loose": s.instruction_level_loose,
          "num_prompts": len(result.responses), "num_truncated": result.num_truncated,
          "mean_response_tokens": result.mean_response_tokens}
