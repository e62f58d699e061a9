"""The consolidation-step benchmarks' shared inputs: their size flags and a random batch."""

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from oel_jax.models import PRESETS, init_model
from oel_jax.train import DistillBatch, TrainConfig, Trainer, make_batch


def add_step_arguments(parser: argparse.ArgumentParser, steps: int = 3) -> None:
  """``--layers --batch --prompt --knowledge --response --steps``: the step's sizes (Qwen3-0.6B
  widths; the teacher reads knowledge + prompt + response, the student prompt + response)."""
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--knowledge", type=int, default=128)
  parser.add_argument("--response", type=int, default=128)
  parser.add_argument("--steps", type=int, default=steps)


def random_step_batch(args: argparse.Namespace, vocab: int = 150_000) -> DistillBatch:
  """A batch of random tokens with the sizes of `add_step_arguments` (seed 0): ``--batch``
  rows of prompt and response, one knowledge text in front of every teacher prompt."""
  rng = np.random.default_rng(0)
  b, p, kn, r = args.batch, args.prompt, args.knowledge, args.response
  prompts = rng.integers(1, vocab, (b, p)).tolist()
  knowledge = rng.integers(1, vocab, kn).tolist()
  responses = rng.integers(1, vocab, (b, r)).tolist()
  return make_batch(prompts, [knowledge + x for x in prompts], responses, pad_id=0)


def random_step_models(args: argparse.Namespace):
  """``(config, student, teacher)``: Qwen3-0.6B widths with ``--layers`` layers, random
  weights; the student float32 with bf16 compute, the teacher bf16 (other weights)."""
  config = PRESETS["Qwen3-0.6B"].replace(num_layers=args.layers, compute_dtype=jnp.bfloat16)
  return (config, init_model(config),
          init_model(config.replace(param_dtype=jnp.bfloat16), seed=1))


def step_setup(args: argparse.Namespace):
  """Prints the machine and the step's sizes; ``(matmul rate, config, student, teacher,
  batch)`` for `add_step_arguments`' ``args``."""
  from machine import matmul_rate  # pylint: disable=import-outside-toplevel
  rate = matmul_rate()
  print(f"machine: {os.cpu_count()} cores; bf16 matmul {rate / 1e9:.0f} GFLOP/s; "
        f"jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}")
  config, student, teacher = random_step_models(args)
  b, p, kn, r = args.batch, args.prompt, args.knowledge, args.response
  print(f"model: Qwen3-0.6B widths, {args.layers} layers, vocab {config.vocab_size}; batch {b}, "
        f"prompt {p}, knowledge {kn}, response {r} ({b * r} scored tokens per step)")
  return rate, config, student, teacher, random_step_batch(args)


def steps_in_turns(variants: Mapping[str, Callable[[], contextlib.AbstractContextManager]],
                   student, teacher, batch: DistillBatch, steps: int,
                   keep_first_state: bool = False):
  """Each variant's step (its program traced inside its context), timed taking turns so
  that all see the same load: ``(first, best)``, per variant the first step's ``(loss,
  grad norm, new state's parameter and optimizer leaves on the host or None)`` and the best
  ``[wall, CPU]`` seconds of ``steps`` further steps (which donate the state)."""
  runs, first = {}, {}
  for name, context in variants.items():
    trainer = Trainer(student, TrainConfig(learning_rate=1e-6, k=256))
    teacher_params = trainer.teacher_params(teacher)
    with context():
      state, metrics = trainer.train_step(trainer.init_state(student), teacher_params, batch)
    leaves = ([np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]
              if keep_first_state else None)
    first[name] = (float(metrics["loss"]), float(metrics["grad_norm"]), leaves)
    runs[name] = [trainer, teacher_params, state]
  best = {name: np.full(2, np.inf) for name in variants}
  for _ in range(steps):
    for name, run in runs.items():
      trainer, teacher_params, state = run
      wall, cpu = time.perf_counter(), time.process_time()
      run[2], metrics = trainer.train_step(state, teacher_params, batch)
      float(metrics["loss"])
      best[name] = np.minimum(best[name], [time.perf_counter() - wall,
                                           time.process_time() - cpu])
  return first, best
