"""Shared-prefix prefill against whole-prompt prefill on an in-context-evaluation-like batch.

In-context evaluation puts one knowledge text into every game's prompt. `Sampler.generate(...,
share_prefix=True)` prefills the prompts' common prefix (chat header, instructions, knowledge)
once at batch 1 and each row's own tokens after it; the peer is today's path, prefilling every
whole prompt. Same sampler, same weights, same run.

Model: Qwen3 with Qwen3-0.6B's widths and 151,936-token vocabulary, `--layers` layers, random
bf16 weights. Batch: `--batch` prompts of a `--knowledge`-token common prefix followed by
per-row situations of 1/2 to 1x `--situation` tokens (random lengths, as games' histories
differ), `--new` new tokens, greedy. Times: best of `--repeats` calls after a warm-up call
(which compiles); "prefill" is a call with one new token.

  python bench/bench_shared_prefix.py [--layers 4] [--batch 32] [--knowledge 1024]
      [--situation 256] [--new 32]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from oel_jax.models.qwen3 import Qwen3Config, init_model
from oel_jax.sampling import Sampler


def best(fn, repeats: int) -> tuple[float, object]:
  fn()  # compile
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return min(times), out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--knowledge", type=int, default=1024)
  parser.add_argument("--situation", type=int, default=256)
  parser.add_argument("--new", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()

  config = Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072,
                       num_layers=args.layers, num_heads=16, num_kv_heads=8, head_dim=128,
                       tie_word_embeddings=True, param_dtype=jnp.bfloat16,
                       compute_dtype=jnp.bfloat16)
  model = init_model(config, seed=0)
  rng = np.random.default_rng(0)
  prefix = rng.integers(1, 150_000, args.knowledge).tolist()
  prompts = [prefix + rng.integers(1, 150_000, int(n)).tolist()
             for n in rng.integers(args.situation // 2, args.situation + 1, args.batch)]
  longest = max(map(len, prompts))
  sampler = Sampler(model, eos_ids=[config.vocab_size - 1], pad_id=0,
                    max_seq_len=longest + args.new + 64)
  print(f"machine: {os.cpu_count()} cores; jax {jax.__version__}; model: Qwen3-0.6B widths, "
        f"{args.layers} layers, vocab {config.vocab_size}, bf16; batch {args.batch}, shared "
        f"prefix {args.knowledge} tokens, own tokens {min(map(len, prompts)) - args.knowledge}"
        f"-{longest - args.knowledge}, {args.new} new tokens, greedy; best of {args.repeats}")
  rows = {}
  for name, share in (("whole prompts", False), ("shared prefix", True)):
    run = lambda new, share=share: sampler.generate(prompts, max_new_tokens=new, temperature=0,
                                                   share_prefix=share)
    prefill, _ = best(lambda: run(1), args.repeats)
    total, out = best(lambda: run(args.new), args.repeats)
    rows[name] = (prefill, total, out)
  print("| path | prefill s (1 new token) | generate s | prefill speed-up | generate speed-up |")
  print("|---|---|---|---|---|")
  base_prefill, base_total, base_out = rows["whole prompts"]
  for name, (prefill, total, _) in rows.items():
    print(f"| {name} | {prefill:.2f} | {total:.2f} | {base_prefill / prefill:.2f}x | "
          f"{base_total / total:.2f}x |")
  same = np.mean([a == b for a, b in zip(rows["shared prefix"][2].tokens, base_out.tokens)])
  print(f"rows with the same greedy tokens: {same:.0%} (bf16: rounding differs between the two "
        "prefills, so near-ties of a random model may flip)")


if __name__ == "__main__":
  main()
