"""The bf16 consolidation step before and after session 14's two re-formulations; same run.

Found by `profile_train_step.py` (session 12 and 14 profiles, docs/benchmarks.md):
- the loss's `[V, H]` gradient tile (`cv,ch->vh`, both operands contracted on their leading
  dimension) had bf16 operands, but XLA:CPU converted them to float32 itself and ran a
  float32 matmul. Now, in 16-bit with a top-k support, its left operand is dz^T `[tile, C]`
  built from logits computed transposed (`chunked._grad_tile_transposed`,
  `_tile_logits_grad_transposed`), a dot XLA:CPU runs in bf16;
- the optimizer: selected after optax's update (`jnp.where(finite, new, old)`), the new
  parameters' fusion recomputed AdamW's moments from the old ones, and XLA copied the old
  moments first (they are donated and overwritten in place). Now `train.apply_optimizer`
  takes the update from the selected moments (bit for bit the same state).

(The third change, the first token chunk's product starting each tile's accumulator instead
of a zero fill and an add, gives the same sums and is in every variant here.)

Each variant is a step traced under a patch that restores the old code for the named part;
this script times them taking turns (best of `--steps`; wall-clock and process CPU time),
gives each one's share of the bf16 matmul rate (the FLOP count of `bench_train_step.py`),
and checks from the same first state: the optimizer's re-formulation leaves the new state
bit for bit; the gradient tile's moves the gradient norm by float32 summation order only.

  python bench/bench_step_efficiency.py [--layers 2] [--batch 4] [--prompt 128] [--response 128]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from step_inputs import add_step_arguments, step_setup, steps_in_turns
from oel_jax import train
from oel_jax.losses import chunked


def _optax_then_select(config, tx, grads, opt_state, params, finite):
  """`train.apply_optimizer` before session 14: optax's update, then each result selected."""
  updates, new_state = tx.update(grads, opt_state, params)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return keep(optax.apply_updates(params, updates), params), keep(new_state, opt_state)


@contextlib.contextmanager
def patched(direct_tile: bool, old_optimizer: bool):
  """Steps traced inside run the pre-session-14 code for the parts named."""
  saved_tile, saved_opt = chunked._grad_tile_transposed, train.apply_optimizer
  if direct_tile:
    chunked._grad_tile_transposed = lambda dtype: False
  if old_optimizer:
    train.apply_optimizer = _optax_then_select
  try:
    yield
  finally:
    chunked._grad_tile_transposed, train.apply_optimizer = saved_tile, saved_opt


def step_flops(config, args) -> float:
  """`bench_train_step.py`'s count: 6 N per student token, 2 N per teacher token (N without
  the embedding), and the LM head's matmuls on the response tokens."""
  b, p, kn, r = args.batch, args.prompt, args.knowledge, args.response
  non_embed = config.num_params() - config.vocab_size * config.hidden_size
  flops = 6 * non_embed * b * (p + r) + 2 * non_embed * b * (kn + p + r)
  return flops + (2 + 2 + 4 + 2) * b * r * config.vocab_size * config.hidden_size


def main():
  parser = argparse.ArgumentParser()
  add_step_arguments(parser)
  args = parser.parse_args()
  rate, config, student, teacher, batch = step_setup(args)
  flops = step_flops(config, args)
  paths = {"direct gradient tile (float32 dot); optax, then select": (True, True),
           "+ gradient tile in bf16 (dz^T from transposed logits)": (False, True),
           "+ optimizer from the selected moments (now)": (False, False)}
  first, best = steps_in_turns(
      {name: functools.partial(patched, *flags) for name, flags in paths.items()},
      student, teacher, batch, args.steps, keep_first_state=True)
  names = list(paths)
  same = all(np.array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(c).view(np.uint8))
             for a, c in zip(first[names[1]][2], first[names[2]][2]))
  first = {name: first[name][:2] for name in names}
  base = names[0]
  print(f"step FLOPs {flops / 1e9:.0f} G")
  print("| step | s (wall / CPU) | speed-up (wall / CPU) | FLOP/s | share of matmul rate | "
        "first loss | first grad norm |")
  print("|---|---|---|---|---|---|---|")
  for name in paths:
    t, (l, g) = best[name], first[name]
    print(f"| {name} | {t[0]:.2f} / {t[1]:.2f} | {best[base][0] / t[0]:.2f}x / "
          f"{best[base][1] / t[1]:.2f}x | {flops / t[0] / 1e9:.0f} G | {flops / t[0] / rate:.0%} "
          f"| {l:.6f} | {g:.6f} |")
  print(f"first step's new state, optimizer re-formulation against optax-then-select: "
        f"{'bit for bit' if same else 'DIFFERENT'}")
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
