"""The consolidation step under bf16 compute, before and after session 12 made its loss head
and backward matmuls bf16; same run.

Found by `profile_train_step.py` (the compiled step's dots and their operand types), before:
- the loss was handed the student's unembedding as stored, float32 master weights, and its
  matmuls take their inputs' common dtype: the student's logits (forward), their
  recomputation and both gradient matmuls (backward) ran in float32;
- every matmul of the model's backward pass ran in float32: `qwen3._einsum` multiplies bf16
  operands into a float32 result, so the cotangent arriving at each dot is float32, and
  JAX's transpose of a dot multiplied it by the other (bf16) operand converted to float32.
Now (the default when the compute dtype is 16-bit): `train._head` casts the unembedding to
the compute dtype before the loss, and `qwen3._einsum` has a custom VJP that rounds the
cotangent to the compute dtype and multiplies in it with float32 accumulation, as mixed
precision does (PyTorch autocast's backward, FSDP's mixed-precision LM head). Float32
compute is unchanged bit for bit (tests/test_train.py).

`before()` restores the old program for a step traced inside it (a patch of both places);
this script times the two, taking turns (best of `--steps`; wall-clock and process CPU
time), and gives each one's first loss and gradient norm from the same state against a
float32-compute step's.

  python bench/bench_step_precision.py [--layers 2] [--batch 4] [--prompt 128] [--response 128]
"""

from __future__ import annotations

import argparse
import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from step_inputs import add_step_arguments, step_setup, steps_in_turns
from oel_jax import train
from oel_jax.models import init_model, qwen3
from oel_jax.train import TrainConfig, Trainer


def _float32_backward_einsum(spec, a, b, dtype):
  """`qwen3._einsum` before session 12: JAX's own transpose (float32 backward matmuls)."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32)


@contextlib.contextmanager
def before():
  """Steps traced inside run the pre-session-12 program: the loss gets the unembedding as
  stored (float32 master weights) and the model's backward matmuls run in float32."""
  saved_einsum, saved_head = qwen3._einsum, train._head
  qwen3._einsum = _float32_backward_einsum
  train._head = lambda model: model.unembedding()
  try:
    yield
  finally:
    qwen3._einsum, train._head = saved_einsum, saved_head


def main():
  parser = argparse.ArgumentParser()
  add_step_arguments(parser)
  args = parser.parse_args()
  _, config, student, teacher, batch = step_setup(args)

  paths = {"before (float32 loss head, float32 backward matmuls)": before,
           "now (bf16 loss head, bf16 backward matmuls)": contextlib.nullcontext}
  # The float32-compute step from the same weights: what each bf16 variant approximates.
  exact = Trainer(init_model(config.replace(compute_dtype=jnp.float32)),
                  TrainConfig(learning_rate=1e-6, k=256))
  f32_teacher = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(teacher))
  _, m32 = exact.train_step(exact.init_state(student), f32_teacher, batch)
  l32, g32 = float(m32["loss"]), float(m32["grad_norm"])
  del exact, f32_teacher, m32
  first, best = steps_in_turns(paths, student, teacher, batch, args.steps)
  base = next(iter(paths))
  print(f"float32 compute: first loss {l32:.6f}, grad norm {g32:.6f}")
  print("| step | s (wall / CPU) | speed-up (wall / CPU) | first loss | first grad norm | "
        "loss error vs float32 | grad-norm error vs float32 |")
  print("|---|---|---|---|---|---|---|")
  for name in paths:
    t, (l, g, _) = best[name], first[name]
    print(f"| {name} | {t[0]:.2f} / {t[1]:.2f} | {best[base][0] / t[0]:.2f}x / "
          f"{best[base][1] / t[1]:.2f}x | {l:.6f} | {g:.6f} | {abs(l - l32) / abs(l32):.1e} | "
          f"{abs(g - g32) / abs(g32):.1e} |")
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
