"""Rollout wall time: continuous batching (`RolloutConfig.slots`) against lockstep, same run.

A thinking model's replies have a heavy tail: most end after a few hundred tokens, a few run
into the 1,024-token budget. Lockstep (`rollout` without slots, today's default) decodes each
turn of all running games in one `generate` call until its longest reply ends; continuous
batching plays each reply as soon as it ends and prefills its game's next turn into the
freed row. The tiny random model plays, with its reply lengths forced
(`oel_jax.reply_lengths.LognormalLengthSampler`): a reply is

    L = min(cap, ceil(exp(log(median) + sigma * z))),  z ~ N(0, 1) per (game, turn) seed,

tokens long (stop token included; at the cap: "length"). Defaults: median 256, sigma 0.8,
cap 1024 (the paper's budget): 4% of the replies reach the cap, so nearly every lockstep
turn of 64 games decodes 1,024 steps. The tiny model's replies are no valid moves, so each
game ends at its second turn (two invalid moves in a row): the fewest turns, the least that
lockstep waits.

Each run's turns are compared with lockstep's: the same tokens, except where a draw's
uniform lies within float32 rounding of a boundary of the inverse CDF (a row's logits differ
in the last bits between batches); lockstep itself differs from lockstep that way when
``max_batch_size`` splits its calls (measured when writing this: 1 turn in 32). Equality is
proven by tests/test_continuous.py; this counts what a long sampled run shows.

  python bench/bench_continuous_batching.py [--games 64] [--slots 64,32,16]
      [--mesh DATA,FSDP,TP]

``--mesh``: the model and both paths split over a (data, fsdp, tp) mesh; without that many
accelerators, on that many simulated CPU devices (``--xla_force_host_platform_device_count``,
set here when XLA_FLAGS does not set it), where only the ratio to lockstep in the same run
means anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np

from oel_jax import chat, parallel, tiny
from oel_jax.envs import ModelInfo, RolloutConfig, continuous, game_seeds, rollout
from oel_jax.reply_lengths import LognormalLengthSampler


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--games", type=int, default=64)
  parser.add_argument("--slots", default="64,32,16")
  parser.add_argument("--median", type=float, default=256)
  parser.add_argument("--sigma", type=float, default=0.8)
  parser.add_argument("--cap", type=int, default=1024)
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--mesh", default=None, help="data,fsdp,tp (default: one device)")
  args = parser.parse_args()
  mesh = None
  if args.mesh:
    sizes = dict(zip(("data", "fsdp", "tp"), (int(x) for x in args.mesh.split(","))))
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      # Read when the backend starts, at the first device query below.
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                 f"platform_device_count={np.prod(list(sizes.values()))}")
    mesh = parallel.make_mesh(parallel.MeshConfig(**sizes))
  tokenizer = tiny.load_tiny_tokenizer()
  model = tiny.tiny_model()
  if mesh is not None:
    model = parallel.shard_model(model, mesh)
  sampler = LognormalLengthSampler(
      model, median=args.median, sigma=args.sigma,
      eos_ids=chat.stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
      max_seq_len=4096, mesh=mesh)
  seeds = game_seeds("train", 0, 0, args.games)
  model = ModelInfo("tiny", 0)
  config = RolloutConfig(max_new_tokens=args.cap, temperature=args.temperature, progress=False)
  print(f"machine: {os.cpu_count()} cores, jax {jax.__version__}, devices: "
        f"{dict(mesh.shape) if mesh is not None else 1} ({jax.devices()[0].platform}); "
        f"tiny model, {args.games} "
        f"frozenlake games, thinking on, temperature {args.temperature}; reply length "
        f"lognormal(median {args.median:g}, sigma {args.sigma:g}) capped at {args.cap}")

  def timed(slots):
    cfg = dataclasses.replace(config, slots=slots)
    start = time.perf_counter()
    rollout(sampler, tokenizer, seeds, cfg, model=model)  # compiles
    first = time.perf_counter() - start
    timings: dict[str, float] = {}
    trajectories = rollout(sampler, tokenizer, seeds, cfg, model=model, timings=timings)
    return trajectories, timings, first

  reference, lock, lock_first = timed(None)
  lengths = np.asarray([turn.metadata["response_tokens"] + (turn.metadata["finish_reason"]
                                                            == "stop")
                        for t in reference for turn in t.turns])
  print(f"replies: {lengths.size}, tokens: {lengths.sum()}, mean {lengths.mean():.0f}, "
        f"median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, at the cap "
        f"{np.mean(lengths >= args.cap):.1%}; turns per game: "
        f"{sorted({len(t.turns) for t in reference})}")
  print("| path | wall s | generate s | calls | first run s (compiles) | lockstep / this | "
        "turns equal to lockstep's |")
  print("|---|---|---|---|---|---|---|")
  print(f"| lockstep (one `generate` per turn) | {lock['wall_s']:.2f} | "
        f"{lock['generate_s']:.2f} | {lock['calls']:.0f} | {lock_first:.1f} | 1.00 | - |",
        flush=True)
  for slots in [int(s) for s in args.slots.split(",")]:
    trajectories, timings, first = timed(slots)
    same = sum(a == b for x, y in zip(reference, trajectories) for a, b in zip(x.turns, y.turns))
    print(f"| slots={slots}, {continuous.CHUNK_STEPS}-step chunks | {timings['wall_s']:.2f} | "
          f"{timings['generate_s']:.2f} | {timings['calls']:.0f} | {first:.1f} | "
          f"{lock['wall_s'] / timings['wall_s']:.2f} | {same} of {lengths.size} |", flush=True)


if __name__ == "__main__":
  main()
