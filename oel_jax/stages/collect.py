"""Stage 1 of a round: the deployed model plays the round's games.

The extraction pool is ``config.extraction_boards`` training boards played
``config.extraction_plays`` times each (play k of every board is the k-th chunk of the pool,
which extraction run k reads with pool_order "chunks"; each play is its own game, as the
official K extraction jobs are), sampled with the extraction settings; the consolidation
pool is ``config.consolidation_games`` further boards, sampled with the deployment settings.
Board seeds are ``game_seeds("train", config.seed, round_, ...)``, fresh every round.

Writes ``trajectories/extraction.jsonl`` and ``trajectories/consolidation.jsonl``.

On several processes (hosts) every process plays every game: the same seeds and the same
sampled tokens (`oel_jax.sampling.Sampler.generate` returns every row to every process) give
the same trajectories, which process 0 writes. Each generation is one program over all the
devices, so the device work is split, not repeated; what every host repeats is the Python
side (environments, chat templates, tokenizing and decoding): 2-3% of this stage's time with
the tiny model, warm (14-21 ms per game and turn on a 2-core Xeon), and less with a real
model, whose generation costs far more. Playing only a host's share of the games would save
at most that, at the price of control flow that differs between hosts (games end at
different turns, yet every process must join every generation) and of gathering the records
to process 0 to write them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from oel_jax import metrics as metrics_lib
from oel_jax.config import RunConfig
from oel_jax.envs import ModelInfo, game_seeds, rollout, write_trajectories
from oel_jax.model_pool import ModelPool
from oel_jax.workdir import Workdir


def run(round_: int, config: RunConfig, workdir: Workdir, pool: ModelPool) -> dict[str, Any]:
  """Plays the round's extraction and consolidation games with the deployed model.

  Returns:
    The stage's done-file record.
  """
  start = time.perf_counter()
  folder = os.path.join(workdir.round_dir(round_), "trajectories")
  os.makedirs(folder, exist_ok=True)
  boards = game_seeds("train", config.seed, round_, config.extraction_boards)
  consol = game_seeds("train", config.seed, round_, config.consolidation_games,
                      start=config.extraction_boards)
  deployed = workdir.deployed_path(round_)
  sampler, tokenizer = pool.sampler(deployed), pool.tokenizer()
  info = ModelInfo(str(deployed), round_)
  plays = [k for k in range(config.extraction_plays) for _ in boards]
  timings: dict[str, float] = {}
  games = {}
  for name, seeds, play in (("extraction", boards * config.extraction_plays, plays),
                            ("consolidation", consol, None)):
    pool_timings: dict[str, float] = {}
    games[name] = rollout(sampler, tokenizer, seeds, config.rollout_for(round_, name),
                          model=info, timings=pool_timings,
                          metadata={"split": "train", "pool": name}, plays=play)
    for key, value in pool_timings.items():
      timings[key] = timings.get(key, 0.0) + value
  paths = {name: os.path.join(folder, f"{name}.jsonl") for name in games}
  for name, path in paths.items():
    write_trajectories(path, games[name])
  metrics = {"extraction": metrics_lib.game_stats(games["extraction"]),
             "consolidation": metrics_lib.game_stats(games["consolidation"]),
             "all": metrics_lib.game_stats(games["extraction"] + games["consolidation"]),
             "timings": timings}
  tokens = metrics["all"]["response_tokens"]
  metrics["tokens_per_s"] = tokens / timings["generate_s"] if timings.get("generate_s") else 0.0
  return workdir.finish(round_, "collect", start, metrics, paths)
