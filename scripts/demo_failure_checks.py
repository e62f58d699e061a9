"""Breaks the loop on purpose and runs the learning demo: the rise must vanish.

Usage:
  python scripts/demo_failure_checks.py BREAK [main flags ...]

BREAK is one of:

- ``none``: nothing broken (the demo as the README runs it);
- ``loss_no_gradient``: the student's hidden states enter the loss through
  ``stop_gradient``, so consolidation computes the loss and never moves the weights;
- ``loss_sign``: the divergence's sign is flipped (the student is pushed away from the teacher);
- ``stale_teacher``: the teacher's prompt carries no knowledge (``insert_knowledge`` returns
  the student's prompt), so the teacher is the round-start model as it was;
- ``sampler_ignores_swap``: `Sampler.update_weights` does nothing, so every rollout, on-policy
  sample and evaluation uses the weights the sampler was built with.

The breaks are monkeypatches in this process only; the library is not changed. A test of the
demo's rise must fail under each of them (tests/test_demo.py's does; results in
docs/benchmarks.md).
"""

import runpy
import sys

import jax


def _break(name: str) -> None:
  from oel_jax import consolidate, losses, sampling, train  # pylint: disable=import-outside-toplevel

  if name == "none":
    return
  if name in ("loss_no_gradient", "loss_sign"):
    original = losses.per_token_divergence_from_hidden

    def broken(student_hidden, *args, **kwargs):
      if name == "loss_no_gradient":
        return original(jax.lax.stop_gradient(student_hidden), *args, **kwargs)
      stats = original(student_hidden, *args, **kwargs)
      return stats._replace(divergence=-stats.divergence)

    train.losses.per_token_divergence_from_hidden = broken
    return
  if name == "stale_teacher":
    consolidate.insert_knowledge = lambda prompt, knowledge: prompt
    return
  if name == "sampler_ignores_swap":
    sampling.Sampler.update_weights = lambda self, model_or_state: None
    return
  raise SystemExit(f"unknown break {name!r}")


if __name__ == "__main__":
  _break(sys.argv.pop(1))
  sys.argv[0] = "oel_jax.main"
  runpy.run_module("oel_jax.main", run_name="__main__", alter_sys=True)
