"""A decode step's weight matmuls in isolation: rows x weights read once, XLA vs PyTorch.

A decode step multiplies a few rows (the batch) by every weight matrix once, so its floor is
reading the weights. This script times that alone: `--matrices` distinct `[H, I]` weight
matrices (Qwen3-0.6B's MLP shape, 1024 x 3072 bf16, 6 MiB each; 128 of them, 768 MiB, more
than the last-level cache), each multiplied by the same `[B, H]` rows in one jitted program
(the dots unrolled, as the decoder layers are in the sampler's loop), float32 accumulation,
and reports the weight bytes read per second beside the machine's read bandwidth measured
in the same run. Forms: XLA with bf16 weights (what the sampler runs), XLA with float32
weights (twice the bytes), and PyTorch's bf16 `matmul` over the same matrices.

  python bench/bench_decode_matmul.py [--batches 1,4,16,64] [--matrices 128]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from machine import best_time, read_bandwidth

H, I = 1024, 3072


def xla_form(weights: list[jax.Array], rows: jax.Array):
  @jax.jit
  def run(ws, x):
    out = jnp.zeros((x.shape[0], I), jnp.float32)
    for w in ws:
      out = out + jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return out
  run(weights, rows).block_until_ready()
  return lambda: run(weights, rows).block_until_ready()


def torch_form(weights: list[torch.Tensor], rows: torch.Tensor):
  def run():
    with torch.no_grad():
      out = torch.zeros(rows.shape[0], I, dtype=torch.float32)
      for w in weights:
        out += torch.matmul(rows, w).float()
    return out
  run()
  return run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", default="1,4,16,64")
  parser.add_argument("--matrices", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  bw = read_bandwidth()
  print(f"machine: {os.cpu_count()} cores; read bandwidth {bw / 1e9:.1f} GB/s; "
        f"jax {jax.__version__}, torch {torch.__version__}; {args.matrices} matrices "
        f"[{H}, {I}], best of {args.repeats}")
  rng = np.random.default_rng(0)
  host = [rng.standard_normal((H, I), np.float32) * 0.02 for _ in range(args.matrices)]
  bf16 = [jnp.asarray(w, jnp.bfloat16) for w in host]
  print("| batch | form | ms per matrix | weights GB/s | share of read bandwidth |")
  print("|---|---|---|---|---|")
  for batch in [int(b) for b in args.batches.split(",")]:
    x = rng.standard_normal((batch, H), np.float32)
    forms = {"XLA bf16": (lambda: xla_form(bf16, jnp.asarray(x, jnp.bfloat16)), 2)}
    forms["PyTorch bf16"] = (lambda: torch_form(
        [torch.from_numpy(np.array(w.astype(jnp.float32))).to(torch.bfloat16) for w in bf16],
        torch.from_numpy(x).to(torch.bfloat16)), 2)
    forms["XLA float32"] = (lambda: xla_form([jnp.asarray(w) for w in host],
                                             jnp.asarray(x)), 4)
    for name, (make, itemsize) in forms.items():
      seconds = best_time(make(), args.repeats) / args.matrices
      rate = H * I * itemsize / seconds
      print(f"| {batch} | {name} | {seconds * 1e3:.3f} | {rate / 1e9:.1f} | {rate / bw:.0%} |",
            flush=True)


if __name__ == "__main__":
  main()
