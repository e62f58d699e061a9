"""Weight sync into the sampler: `Sampler.update_weights` vs a full parameter copy vs decoding.

On-policy consolidation puts the student's weights into the sampler before every sampling,
and `ModelPool.sampler` syncs on every request. This measures what such a sync costs, next
to what it would cost if it copied the parameters (a `jnp.copy` of every array, which
on-policy consolidation did before each sync until the sync shared the train state's
buffers) and next to one `generate` call, the work a sync sits between.

Model: Qwen3 with Qwen3-0.6B's widths and full 151,936 vocabulary, fewer layers (default
2), random bf16 weights. Decode: a batch of 8 prompts of 32 tokens, 32 new tokens, greedy.

  python bench/bench_weight_sync.py [--layers 2] [--batch 8] [--new 32]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from machine import best_time, copy_bandwidth
from oel_jax.models import PRESETS, init_model
from oel_jax.sampling import Sampler

PROMPT = 32


def buffers(params) -> list[int]:
  """Every parameter's device buffer addresses (one per shard)."""
  return [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(params)
          for s in x.addressable_shards]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  bw = copy_bandwidth()
  print(f"machine: {os.cpu_count()} cores; copy bandwidth {bw / 1e9:.1f} GB/s; "
        f"jax {jax.__version__}, {jax.device_count()} device(s) ({jax.devices()[0].platform})")
  config = PRESETS["Qwen3-0.6B"].replace(num_layers=args.layers, param_dtype=jnp.bfloat16,
                                         compute_dtype=jnp.bfloat16)
  model = init_model(config)
  state = nnx.state(model)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  print(f"model: Qwen3-0.6B widths, {args.layers} layers, vocab {config.vocab_size}, "
        f"{config.num_params() / 1e6:.0f}M params, bf16 ({nbytes / 2 ** 20:.0f} MiB); "
        f"decode batch {args.batch}, prompt {PROMPT}, {args.new} new tokens, greedy")
  sampler = Sampler(model, eos_ids=[config.vocab_size - 1], pad_id=0,
                    max_seq_len=PROMPT + args.new + 32)
  # Another set of weights, as a train step would produce: distinct buffers, same placement.
  student = jax.tree.map(jnp.copy, state)
  jax.block_until_ready(student)

  def sync():
    sampler.update_weights(student)
    jax.block_until_ready(sampler._params)  # pylint: disable=protected-access

  def copy():
    jax.block_until_ready(jax.tree.map(jnp.copy, student))

  def copy_then_sync():  # on-policy consolidation's sync before it shared the buffers
    sampler.update_weights(jax.tree.map(jnp.copy, student))
    jax.block_until_ready(sampler._params)  # pylint: disable=protected-access

  prompts = np.random.default_rng(0).integers(1, 150_000, (args.batch, PROMPT)).tolist()

  def decode():
    sampler.generate(prompts, max_new_tokens=args.new, temperature=0)

  sync()
  held = sampler._params  # pylint: disable=protected-access
  assert buffers(held) == buffers(student), "update_weights copied the weights"
  decode()  # compile
  times = {"update_weights": best_time(sync, args.repeats),
           "full copy": best_time(copy, args.repeats),
           "copy + update_weights": best_time(copy_then_sync, args.repeats),
           "generate": best_time(decode, max(2, args.repeats // 2))}
  print(f"full copy: {2 * nbytes / times['full copy'] / 1e9:.1f} GB/s (read + written)")
  print("| operation | ms | / update_weights | / generate |")
  print("|---|---|---|---|")
  for name, t in times.items():
    print(f"| {name} | {t * 1e3:.3f} | {t / times['update_weights']:.0f}x | "
          f"{t / times['generate']:.4f} |")


if __name__ == "__main__":
  main()
