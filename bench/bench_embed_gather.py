"""The embedding lookup in decode: gathered as uint16 bits (today) vs the plain bf16 gather.

XLA:CPU gathers 16-bit floats in float32; in a `Sampler` program it hoisted the conversion
of the loop-invariant table out of the decode loop, so every `generate` call converted the
whole bf16 `[V, H]` table to float32 (622 MB written at Qwen3-0.6B's sizes) to gather a few
rows per step. `qwen3.embed_tokens` now gathers the table's uint16 bits behind an
optimisation barrier (`qwen3._take_rows_by_bits`). The plain gather is compiled here by
swapping that function for `jnp.take` while the peer sampler traces its programs.

Model: Qwen3-0.6B's widths and 151,936-token vocabulary (tied head), few layers, random bf16
weights; prompts of 32 tokens, greedy. Per batch: a call for 1 new token (prefill + first
token; the per-call conversion lands here) and for `--new` tokens; the decode step is their
difference over `--new - 1`. The two samplers take turns within each repeat (best of
`--repeats`), so a shared machine's load falls on both; each time is printed as wall-clock
and as this process's CPU time (all threads), which other processes' load inflates far less.
Also prints each program's compiled temporaries and whether it writes a float32 copy of the
table.

  python bench/bench_embed_gather.py [--layers 2] [--batches 1,16,64] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from machine import matmul_rate, read_bandwidth
from oel_jax.models import PRESETS, qwen3
from oel_jax.sampling import Sampler

PROMPT = 32


@contextlib.contextmanager
def plain_gather():
  """Programs traced inside gather the bf16 table with `jnp.take` (the code before)."""
  saved = qwen3._take_rows_by_bits
  qwen3._take_rows_by_bits = lambda table, ids: jnp.take(table, ids, axis=0)
  try:
    yield
  finally:
    qwen3._take_rows_by_bits = saved


def table_copies(sampler: Sampler, batch: int, new: int) -> tuple[int, bool]:
  """Compiled temporaries (bytes) of the sampler's program, and whether it holds a float32
  buffer of the table's shape."""
  c = sampler.config
  compiled = sampler.lower(batch, PROMPT, new).compile()
  return (compiled.memory_analysis().temp_size_in_bytes,
          f"f32[{c.vocab_size},{c.hidden_size}]" in compiled.as_text())


def timed(fn) -> np.ndarray:
  """(wall-clock, process CPU) seconds of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return np.asarray([time.perf_counter() - wall, time.process_time() - cpu])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batches", default="1,16,64")
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  config = PRESETS["Qwen3-0.6B"].replace(num_layers=args.layers, param_dtype=jnp.bfloat16,
                                         compute_dtype=jnp.bfloat16)
  model = qwen3.init_model(config)
  kw = dict(eos_ids=[config.vocab_size - 1], pad_id=0, max_seq_len=PROMPT + args.new + 32)
  ours, plain = Sampler(model, **kw), Sampler(model, **kw)
  del model

  print(f"machine: {os.cpu_count()} cores; bf16 matmul {matmul_rate() / 1e9:.0f} GFLOP/s; "
        f"read bandwidth {read_bandwidth(repeats=3) / 1e9:.1f} GB/s; jax {jax.__version__}; "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"Qwen3-0.6B widths, {args.layers} layers, vocab {config.vocab_size:,}, tied, bf16; "
        f"prompt {PROMPT}, greedy; best of {args.repeats}, the two paths taking turns")
  print("Times in ms as wall / process CPU; speed-ups of today's path over the plain gather "
        "(wall / CPU)")
  print("| batch | path | temp MB | f32 table copy | 1-token call | "
        f"{args.new}-token call | decode step | speed-up: 1-token call | "
        f"{args.new}-token call | step | tokens equal |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for batch in (int(b) for b in args.batches.split(",")):
    prompts = rng.integers(1, 150_000, (batch, PROMPT)).tolist()
    runs = {"bits (today)": ours, "plain bf16 gather": plain}
    memory = {}
    for name, sampler in runs.items():
      with plain_gather() if sampler is plain else contextlib.nullcontext():
        memory[name] = table_copies(sampler, batch, args.new)
        for n in (1, args.new):  # compile both programs under the same gather
          sampler.generate(prompts, max_new_tokens=n, temperature=0)
    one = {n: np.full(2, np.inf) for n in runs}  # best (wall, CPU) seconds
    full = {n: np.full(2, np.inf) for n in runs}
    outs = {}
    for _ in range(args.repeats):
      for name, sampler in runs.items():
        gen = lambda n, s=sampler: s.generate(prompts, max_new_tokens=n, temperature=0)
        one[name] = np.minimum(one[name], timed(lambda: gen(1)))
        full[name] = np.minimum(full[name], timed(lambda: gen(args.new)))
        outs[name] = gen(args.new).tokens
    step = {n: (full[n] - one[n]) / (args.new - 1) for n in runs}
    base = "plain bf16 gather"
    ms = lambda t: f"{t[0] * 1e3:.1f} / {t[1] * 1e3:.1f}"
    ratio = lambda a, b: f"{a[0] / b[0]:.2f}x / {a[1] / b[1]:.2f}x"
    for name in runs:
      temp, f32 = memory[name]
      print(f"| {batch} | {name} | {temp / 1e6:.0f} | {'yes' if f32 else 'no'} | "
            f"{ms(one[name])} | {ms(full[name])} | {ms(step[name])} | "
            f"{ratio(one[base], one[name])} | {ratio(full[base], full[name])} | "
            f"{ratio(step[base], step[name])} | {outs[name] == outs[base]} |", flush=True)
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  sys.exit(main())
