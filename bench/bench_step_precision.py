"""Where the consolidation step computes in float32 under bf16 compute, and what bf16 there
would save: today's step against two experiments, same run.

Found by `profile_train_step.py` (the compiled step's dots and their operand types):
- the loss is handed the student's unembedding as stored, float32 master weights, and its
  matmuls take their inputs' common dtype: the student's logits (forward), their
  recomputation and both gradient matmuls (backward) run in float32, while the teacher's
  run in bf16 and the model's own `Qwen3.logits` casts the head to the compute dtype;
- every matmul of the model's backward pass runs in float32: `qwen3._einsum` multiplies bf16
  operands into a float32 result, so the cotangent arriving at each dot is float32, and
  JAX's transpose of a dot multiplies that float32 cotangent by the other (bf16) operand
  converted to float32.
On a CPU whose bf16 matmuls use AMX (or AVX-512 BF16) a float32 matmul runs several times
slower. The experiments, each traced under a patch:
- "bf16 loss head": the unembedding cast to the compute dtype before the loss (patching
  `Qwen3.unembedding`); bf16 matmuls with float32 accumulation, as the teacher's;
- "+ bf16 backward": also `qwen3._einsum` with a custom VJP that rounds the cotangent to the
  compute dtype and multiplies in it (float32 accumulation), as PyTorch autocast's backward
  does. Where the cotangent came from a bf16 value (most dots' outputs are cast to bf16
  at once) that rounding is exact; where it did not (the q/k norms and RoPE, the attention
  scores' softmax) it rounds.
Both change the loss and gradients by bf16 rounding (not bit-identical; float32 compute is
untouched), so they are measured here, not made the default.

Setup as `bench_train_step.py` (Qwen3-0.6B widths, full vocabulary, bf16 compute, float32
master weights, bf16 teacher, top-256 reverse KL, AdamW). The steps take turns (best of
`--steps`); wall-clock and process CPU time; each one's first loss and gradient norm from
the same state, against a float32-compute step's.

  python bench/bench_step_precision.py [--layers 2] [--batch 4] [--prompt 128] [--response 128]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from machine import matmul_rate
from step_inputs import add_step_arguments, random_step_batch
from oel_jax.models import PRESETS, init_model, qwen3
from oel_jax.models.qwen3 import Qwen3
from oel_jax.train import TrainConfig, Trainer


@contextlib.contextmanager
def head_in_compute_dtype():
  """Steps traced inside hand the loss the unembedding cast to the compute dtype."""
  saved = Qwen3.unembedding
  Qwen3.unembedding = lambda self: saved(self).astype(self.config.compute_dtype)
  try:
    yield
  finally:
    Qwen3.unembedding = saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_16(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_16_fwd(spec, a, b):
  return _einsum_16(spec, a, b), (a, b)


def _einsum_16_bwd(spec, residuals, g):
  a, b = residuals
  (sa, sb), out = spec.split("->")[0].split(","), spec.split("->")[1]
  g = g.astype(a.dtype)
  da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_einsum_16.defvjp(_einsum_16_fwd, _einsum_16_bwd)


@contextlib.contextmanager
def backward_in_compute_dtype():
  """Also: the model's matmuls multiply their cotangents in the compute dtype."""
  saved = qwen3._einsum

  def einsum(spec, a, b, dtype):
    if jnp.dtype(dtype).itemsize != 2:
      return saved(spec, a, b, dtype)
    return _einsum_16(spec, a.astype(dtype), b.astype(dtype))

  qwen3._einsum = einsum
  try:
    with head_in_compute_dtype():
      yield
  finally:
    qwen3._einsum = saved


def main():
  parser = argparse.ArgumentParser()
  add_step_arguments(parser)
  args = parser.parse_args()
  print(f"machine: {os.cpu_count()} cores; bf16 matmul {matmul_rate() / 1e9:.0f} GFLOP/s; "
        f"jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}")
  config = PRESETS["Qwen3-0.6B"].replace(num_layers=args.layers, compute_dtype=jnp.bfloat16)
  student = init_model(config)
  teacher = init_model(config.replace(param_dtype=jnp.bfloat16), seed=1)
  batch = random_step_batch(args)
  b, p, kn, r = args.batch, args.prompt, args.knowledge, args.response
  print(f"model: Qwen3-0.6B widths, {args.layers} layers, vocab {config.vocab_size}; batch {b}, "
        f"prompt {p}, knowledge {kn}, response {r} ({b * r} scored tokens per step)")

  paths = {"today (float32 loss head, float32 backward)": contextlib.nullcontext,
           "bf16 loss head": head_in_compute_dtype,
           "bf16 loss head + bf16 backward": backward_in_compute_dtype}
  # The float32-compute step from the same weights: what each bf16 variant approximates.
  exact = Trainer(init_model(config.replace(compute_dtype=jnp.float32)),
                  TrainConfig(learning_rate=1e-6, k=256))
  f32_teacher = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(teacher))
  _, m32 = exact.train_step(exact.init_state(student), f32_teacher, batch)
  l32, g32 = float(m32["loss"]), float(m32["grad_norm"])
  del exact, f32_teacher, m32
  trainers, states, first = {}, {}, {}
  for name, context in paths.items():
    trainer = Trainer(student, TrainConfig(learning_rate=1e-6, k=256))
    teacher_params = trainer.teacher_params(teacher)
    with context():
      state, metrics = trainer.train_step(trainer.init_state(student), teacher_params, batch)
    trainers[name], states[name] = (trainer, teacher_params), state
    first[name] = (float(metrics["loss"]), float(metrics["grad_norm"]))
  best = {name: np.full(2, np.inf) for name in paths}
  for _ in range(args.steps):
    for name in paths:
      trainer, teacher_params = trainers[name]
      wall, cpu = time.perf_counter(), time.process_time()
      states[name], metrics = trainer.train_step(states[name], teacher_params, batch)
      float(metrics["loss"])
      best[name] = np.minimum(best[name], [time.perf_counter() - wall,
                                           time.process_time() - cpu])
  base = next(iter(paths))
  print(f"float32 compute: first loss {l32:.6f}, grad norm {g32:.6f}")
  print("| step | s (wall / CPU) | speed-up (wall / CPU) | first loss | first grad norm | "
        "loss error vs float32 | grad-norm error vs float32 |")
  print("|---|---|---|---|---|---|---|")
  for name in paths:
    t, (l, g) = best[name], first[name]
    print(f"| {name} | {t[0]:.2f} / {t[1]:.2f} | {best[base][0] / t[0]:.2f}x / "
          f"{best[base][1] / t[1]:.2f}x | {l:.6f} | {g:.6f} | {abs(l - l32) / abs(l32):.1e} | "
          f"{abs(g - g32) / abs(g32):.1e} |")
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
