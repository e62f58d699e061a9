"""Stage 1 of a round: the deployed model plays the round's games, or recorded experience is read.

The extraction pool is ``config.extraction_boards`` training boards played
``config.extraction_plays`` times each (play k of every board is the k-th chunk of the pool,
which extraction run k reads with pool_order "chunks"; each play is its own game, as the
official K extraction jobs are), sampled with the extraction settings; the consolidation
pool is ``config.consolidation_games`` further boards, sampled with the deployment settings.
Board seeds are ``game_seeds("train", config.seed, round_, ...)``, fresh every round.

Writes ``trajectories/extraction.jsonl`` and ``trajectories/consolidation.jsonl``.

Recorded experience (``config.collect.source = "files"``): no game is played and no model is
loaded. The round reads the trajectory files that ``collect.trajectory_files`` matches (in
glob order, each file's records in file order), then the conversations of
``collect.served_workdir``'s log up to ``collect.served_until`` (when empty: the time this
collect runs), and writes **every record to both pools**: ``extraction.jsonl`` and
``consolidation.jsonl`` hold the same records. A deployment's traffic is one stream of
experience, as the paper's deployed model's games are, and the two pools are two uses of it:
extraction reads ``extraction.num_trajectories`` of them per run (``pool_order``), and
consolidation trains on turns drawn from all of them. The records are written as read (their
model, env and outcome are the deployment's), so the round's files say what was learned from.

Rounds after the first (``collect.later_rounds``): "all" reads all the recorded experience
again, as it is when that round's collect runs (the globs matched anew; the serve log up to
the cut-off), so a fixed set of files gives every round the same records, and later rounds
differ by the model they consolidate into and their seeds; "new" reads only what no earlier
round read: files whose SHA-256 no earlier round's collect recorded, and served requests
created after the previous round's cut-off (recorded in its ``collect.done.json``, metrics
``source.served.until``). A round with nothing to read stops with an error naming the
settings; so does a pool too small for extraction (``num_trajectories``, or ``num_runs x
num_trajectories`` with pool_order "chunks").

A deployment that learns as it serves: serve the model, run one round on the log
(``later_rounds "new"``, ``served_until`` ""), hot-reload the server with ``round_000/model``,
and later run the same command with ``--config.rounds=2``: round 1 reads the requests served
since round 0's cut-off (by round 0's model), and so on (``rounds`` may change in a workdir).

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
from oel_jax.errors import InputError
from oel_jax.model_pool import ModelPool
from oel_jax.trajectories.records import parse_time
from oel_jax.trajectories.sources import read_recorded
from oel_jax.workdir import Workdir


def run(round_: int, config: RunConfig, workdir: Workdir, pool: ModelPool) -> dict[str, Any]:
  """Plays the round's extraction and consolidation games with the deployed model, or reads
  recorded experience (``config.collect.source = "files"``).

  Returns:
    The stage's done-file record.
  """
  start = time.perf_counter()
  folder = os.path.join(workdir.round_dir(round_), "trajectories")
  os.makedirs(folder, exist_ok=True)
  if config.collect.recorded:
    return _recorded(round_, config, workdir, folder, start)
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


def _earlier(round_: int, workdir: Workdir) -> tuple[set[str], float | None]:
  """What earlier rounds read: their files' digests, and the previous round's served cut-off."""
  digests: set[str] = set()
  after = None
  for r in range(round_):
    marker = workdir.marker(r, "collect")
    source = (marker or {}).get("metrics", {}).get("source", {})
    digests.update(f["sha256"] for f in source.get("files", []) if not f.get("skipped"))
    if r == round_ - 1 and source.get("served"):
      after = source["served"]["until"]
  return digests, after


def _recorded(round_: int, config: RunConfig, workdir: Workdir, folder: str,
              start: float) -> dict[str, Any]:
  """Reads the round's recorded experience into both pools (see the module docstring)."""
  c = config.collect
  until = parse_time(c.served_until) if c.served_until else time.time()
  new_only = c.later_rounds == "new" and round_ > 0
  read_before, after = _earlier(round_, workdir) if new_only else (set(), None)
  recorded = read_recorded(c.trajectory_files, c.served_workdir, until=until, after=after,
                           read_before=read_before)
  records = recorded.trajectories
  named = " and ".join(f"config.collect.{n}={getattr(c, n)!r}"
                       for n in ("trajectory_files", "served_workdir") if getattr(c, n))
  if not records:
    since = " not read by an earlier round (config.collect.later_rounds='new')" \
        if new_only else ""
    raise InputError(f"round {round_}: no recorded experience{since} in {named}")
  ex = config.extraction
  need = ex.num_trajectories * (ex.num_runs if ex.pool_order == "chunks" else 1)
  if len(records) < need:
    rule = (f"num_runs x num_trajectories = {ex.num_runs} x {ex.num_trajectories}"
            if ex.pool_order == "chunks" else f"num_trajectories = {ex.num_trajectories}")
    raise InputError(f"round {round_}: {len(records)} recorded trajectories in {named}; "
                     f"config.extraction ({rule}, pool_order {ex.pool_order!r}) needs {need}; "
                     "lower config.extraction.num_trajectories, or record more")
  paths = {name: os.path.join(folder, f"{name}.jsonl")
           for name in ("extraction", "consolidation")}
  for path in paths.values():
    write_trajectories(path, records)
  stats = metrics_lib.game_stats(records)
  metrics = {"extraction": stats, "consolidation": stats, "all": stats, "timings": {},
             "tokens_per_s": 0.0,
             "source": {"kind": "files", "trajectories": len(records), "files": recorded.files,
                        "served": recorded.served}}
  return workdir.finish(round_, "collect", start, metrics, paths)
