"""The consolidation-step benchmarks' shared inputs: their size flags and a random batch."""

import argparse

import jax.numpy as jnp
import numpy as np

from oel_jax.models import PRESETS, init_model
from oel_jax.train import DistillBatch, make_batch


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
