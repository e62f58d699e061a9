"""Time outside generation per game turn in a 64-game lockstep rollout (tiny model).

The environment side (TextArena steps, chat templating, decoding, trajectory records) must
not be the bottleneck: target under 5% of each turn's wall time. The peer is the sampler
itself, timed in the same run: the ratio printed is other / (generate + other).

  python bench/bench_rollout_overhead.py [--games 64] [--new 128,512]
"""

from __future__ import annotations

import argparse
import os

import jax

from oel_jax import chat, tiny
from oel_jax.envs import ModelInfo, RolloutConfig, game_seeds, rollout
from oel_jax.sampling import Sampler


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--games", type=int, default=64)
  parser.add_argument("--new", default="128,512")
  parser.add_argument("--env", default="frozenlake")
  args = parser.parse_args()
  tokenizer = tiny.load_tiny_tokenizer()
  sampler = Sampler(tiny.tiny_model(), eos_ids=chat.stop_token_ids(tokenizer),
                    pad_id=tokenizer.pad_token_id, max_seq_len=8192)
  seeds = game_seeds("train", 0, 0, args.games)
  print(f"machine: {os.cpu_count()} cores, jax {jax.__version__}; tiny model, {args.games} "
        f"{args.env} games, thinking on, temperature 0.7")
  print("| new tokens/turn | turns | generate s | other s | other ms/game-turn | "
        "other share |")
  print("|---|---|---|---|---|---|")
  for new in [int(n) for n in args.new.split(",")]:
    config = RolloutConfig(env=args.env, max_new_tokens=new, progress=False)
    rollout(sampler, tokenizer, seeds, config, model=ModelInfo("tiny", 0))  # compile
    timings: dict[str, float] = {}
    trajectories = rollout(sampler, tokenizer, seeds, config, model=ModelInfo("tiny", 0),
                           timings=timings)
    game_turns = sum(len(t.turns) for t in trajectories)
    share = timings["other_s"] / (timings["generate_s"] + timings["other_s"])
    print(f"| {new} | {game_turns} | {timings['generate_s']:.2f} | {timings['other_s']:.3f} | "
          f"{1e3 * timings['other_s'] / game_turns:.2f} | {share:.2%} |", flush=True)


if __name__ == "__main__":
  main()
