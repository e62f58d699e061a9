"""Consolidation step with the teacher's cached knowledge prefixes vs today's whole prompts.

Issue 15, item 1. At the paper's proportions each teacher row is knowledge (up to 8,192
tokens) + the student's prompt and response (about 2,048): the knowledge is ~4x the student's
sequence. Here, scaled to a CPU: student rows of header + situation + response, teacher rows
of header + one of C knowledge texts (about 4x the student row, different lengths) +
situation + response, rows drawing the texts at random. Both steps are the same `Trainer`
step (bf16 compute, float32 master weights, top-256 reverse KL, AdamW); one gets whole
teacher rows (`make_batch`), the other the rows' rests after the cached prefixes
(`with_teacher_prefix`, cache made once by `Trainer.knowledge_prefix`).

Prints the step time of each (best of --steps, measured alternately), the ratio, the
teacher-only forward of each (the same teacher computation, jitted alone) and its share of
its step, and the once-per-round prefill time.

The model keeps Qwen3's per-layer widths (0.6B: hidden 1024, 16/8 heads of 128, MLP 3072)
with few layers; the vocabulary is scaled down with the depth (8,192 for 4 layers) so that
the LM head's share of the parameters (~10%) is that of Qwen3-4B/8B, not of a 4-layer model
with a 151,936-row head.

  python bench/bench_teacher_prefix.py [--layers 4] [--batch 2] [--knowledge 1024] ...
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from machine import matmul_rate
from oel_jax import teacher_prefix
from oel_jax.models import Qwen3Config, init_model
from oel_jax.train import TrainConfig, Trainer, make_batch, with_teacher_prefix


def _best(fn, repeats):
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--header", type=int, default=16, help="prompt tokens before the knowledge")
  parser.add_argument("--situation", type=int, default=48, help="per-row prompt tokens")
  parser.add_argument("--response", type=int, default=192)
  parser.add_argument("--knowledge", type=int, default=1024, help="longest knowledge text")
  parser.add_argument("--texts", type=int, default=4, help="knowledge texts (C)")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  print(f"machine: {os.cpu_count()} cores; bf16 matmul {matmul_rate() / 1e9:.0f} GFLOP/s; "
        f"jax {jax.__version__}")

  config = Qwen3Config(vocab_size=args.vocab, hidden_size=1024, intermediate_size=3072,
                       num_layers=args.layers, num_heads=16, num_kv_heads=8, head_dim=128,
                       compute_dtype=jnp.bfloat16)
  student = init_model(config, seed=0)
  teacher_state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(student))

  rng = np.random.default_rng(0)
  tok = lambda n: rng.integers(1, args.vocab, n).tolist()
  b, c = args.batch, args.texts
  header = tok(args.header)
  # Knowledge lengths from the longest down to 3/4 of it.
  lengths = np.linspace(args.knowledge, args.knowledge * 3 // 4, c).astype(int)
  knowledge = [tok(n) for n in lengths]
  prefix_ids = [header + k for k in knowledge]
  contexts = rng.integers(0, c, b).tolist()
  situations = [tok(args.situation) for _ in range(b)]
  responses = [tok(args.response) for _ in range(b)]
  student_prompts = [header + s for s in situations]
  teacher_prompts = [header + knowledge[x] + s for x, s in zip(contexts, situations)]
  whole = make_batch(student_prompts, teacher_prompts, responses, pad_id=0)
  cached = with_teacher_prefix(student_prompts, teacher_prompts, responses, contexts,
                               prefix_ids, pad_id=0)
  s_len = len(student_prompts[0]) + args.response
  print(f"model: Qwen3-0.6B layer widths, {args.layers} layers, vocab {args.vocab}, bf16 "
        f"compute; batch {b}; student rows {s_len} tokens; teacher rows {whole.teacher_ids.shape[1]}"
        f" tokens (knowledge {min(lengths)}..{max(lengths)}, {c} texts, "
        f"{max(lengths) / s_len:.1f}x the student row); cached teacher rows "
        f"{cached.teacher_ids.shape[1]} tokens")

  trainer = Trainer(student, TrainConfig(learning_rate=1e-6, k=256))
  teacher_params = trainer.teacher_params(nnx.merge(trainer.graphdef, teacher_state))
  start = time.perf_counter()
  prefix = trainer.knowledge_prefix(teacher_params, prefix_ids)
  jax.block_until_ready(prefix.kv)
  prefill_first = time.perf_counter() - start
  prefill = _best(lambda: trainer.knowledge_prefix(teacher_params, prefix_ids).kv, 1)

  graphdef = trainer.graphdef

  @jax.jit
  def teacher_whole(params, batch):
    hidden, _ = nnx.merge(graphdef, params).hidden_states(batch.teacher_ids,
                                                          attention_mask=batch.teacher_mask)
    return jnp.take_along_axis(hidden, batch.teacher_index[..., None], axis=1)

  @jax.jit
  def teacher_cached(params, kv, batch):
    hidden = teacher_prefix.hidden_states_with_prefix(
        nnx.merge(graphdef, params), kv, batch.teacher_ids, batch.teacher_mask,
        batch.teacher_context, batch.teacher_prefix_len)
    return jnp.take_along_axis(hidden, batch.teacher_index[..., None], axis=1)

  a = teacher_whole(teacher_params, whole)
  bb = teacher_cached(teacher_params, prefix.kv, cached)
  diff = float(jnp.max(jnp.abs(a.astype(jnp.float32) - bb.astype(jnp.float32))))
  scale = float(jnp.max(jnp.abs(a.astype(jnp.float32))))

  # The first step of each from the same weights (also compiles both).
  _, m0 = trainer.train_step(trainer.init_state(student), teacher_params, whole)
  state, m1 = trainer.train_step(trainer.init_state(student), teacher_params, cached,
                                 teacher_prefix=prefix)
  runs = {  # each returns when its result is ready
      "step, today": lambda st: trainer.train_step(st, teacher_params, whole)[0],
      "step, cached": lambda st: trainer.train_step(st, teacher_params, cached,
                                                    teacher_prefix=prefix)[0],
      "teacher, today": lambda st: (teacher_whole(teacher_params, whole).block_until_ready(),
                                    st)[1],
      "teacher, cached": lambda st: (teacher_cached(teacher_params, prefix.kv, cached)
                                     .block_until_ready(), st)[1],
  }
  wall = {name: float("inf") for name in runs}
  cpu = dict(wall)
  for _ in range(args.steps):  # round-robin, so that load on a shared machine hits all
    for name, run in runs.items():
      w0, c0 = time.perf_counter(), time.process_time()
      state = run(state)
      wall[name] = min(wall[name], time.perf_counter() - w0)
      cpu[name] = min(cpu[name], time.process_time() - c0)

  print(f"teacher hidden states at the response positions, cached vs whole: max |diff| "
        f"{diff:.3g} (bf16; max |value| {scale:.3g}); first-step loss {m0['loss']:.6g} "
        f"(whole) vs {m1['loss']:.6g} (cached), grad norm {m0['grad_norm']:.6g} vs "
        f"{m1['grad_norm']:.6g}")
  print(f"prefill once per round ({c} texts, {prefix.kv.slots} slots): {prefill:.2f} s "
        f"({prefill_first:.1f} s with its compile)")
  print(f"best of {args.steps}, wall-clock s and this process's CPU s (all threads; the "
        "CPU time is less disturbed by other processes on a shared machine)")
  print("| path | step wall s | step CPU s | teacher fwd wall s | teacher fwd CPU s | "
        "teacher share (CPU) | step speed-up wall | step speed-up CPU |")
  print("|---|---|---|---|---|---|---|---|")
  for path in ("today", "cached"):
    sw, sc = wall[f"step, {path}"], cpu[f"step, {path}"]
    tw, tc = wall[f"teacher, {path}"], cpu[f"teacher, {path}"]
    print(f"| {path} | {sw:.2f} | {sc:.2f} | {tw:.2f} | {tc:.2f} | {tc / sc:.0%} | "
          f"{wall['step, today'] / sw:.2f}x | {cpu['step, today'] / sc:.2f}x |")
  load = os.getloadavg()
  print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
        f"({os.cpu_count()} cores)")

if __name__ == "__main__":
  main()
