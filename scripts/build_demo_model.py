"""Trains the learning demo's model from scratch and writes it to ``oel_jax/assets/demo_model/``.

Usage:
  python scripts/build_demo_model.py [--out DIR] [--seed 0] [--steps 800]

The model is the tiny Qwen3 architecture (`oel_jax.tiny`: 4 layers, width 256, the tiny
tokenizer; 3.7M parameters) with fresh random weights, trained by supervised fine-tuning
(`oel_jax.sft`) on the synthetic curriculum of `oel_jax.demo.curriculum` only: scripted
FrozenLake play on lakes with thin ice without and with a knowledge block, and scripted
answers to the paper's extraction prompt. The demo's world (`curriculum.DEMO_THIN_ICE` on lake
`curriculum.DEMO_LAKE`) never appears in it.

Determinism: the curriculum comes from ``random.Random(seed)``, the initial weights from
``seed``, and the batches from a ``numpy`` generator seeded with ``seed``; the XLA:CPU
program is deterministic, so the same command on the same software gives the same weights.
``build_info.json`` beside the weights records the settings, the versions and the loss curve.
"""

import argparse
import collections
import json
import math
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from oel_jax import chat, tiny  # pylint: disable=wrong-import-position
from oel_jax.atomic_write import atomic_write_text  # pylint: disable=wrong-import-position
from oel_jax.demo import curriculum  # pylint: disable=wrong-import-position
from oel_jax.models import init_model, save_hf  # pylint: disable=wrong-import-position
from oel_jax.sft import SFTStep, make_sft_batch  # pylint: disable=wrong-import-position

DEFAULT_OUT = os.path.join(_REPO, "oel_jax", "assets", "demo_model")

# Sequence lengths of the batches (a pair goes to the shortest that holds it), and the rows
# per batch at each, about 6k tokens per step.
BUCKETS = (256, 384, 640, 896, 1152)
ROWS = {256: 24, 384: 16, 640: 10, 896: 7, 1152: 5}


def encode(tokenizer, example) -> tuple[list[int], list[int]]:
  """(prompt ids as the loop renders them, reply ids ending in <|im_end|>)."""
  prompt = chat.encode_chat(tokenizer, [{"role": "user", "content": example.prompt}],
                            enable_thinking=False)
  reply = tokenizer.encode(example.reply, add_special_tokens=False) + [tiny.IM_END_ID]
  return prompt, reply


def build_data(seed: int, count: int, tokenizer):
  """``count`` encoded curriculum pairs, grouped by bucket; and counts per skill."""
  by_bucket = collections.defaultdict(list)
  skills = collections.Counter()
  stream = curriculum.examples(seed)
  while sum(skills.values()) < count:
    example = next(stream)
    prompt, reply = encode(tokenizer, example)
    n = len(prompt) + len(reply)
    bucket = next((b for b in BUCKETS if b >= n), None)
    if bucket is None:
      continue
    by_bucket[bucket].append((prompt, reply, example.skill))
    skills[example.skill] += 1
  return by_bucket, skills


def batches(by_bucket, steps: int, rng: np.random.Generator):
  """``steps`` batches: buckets drawn in proportion to their tokens, rows without repeats
  until a bucket is used up (then it is reshuffled)."""
  buckets = sorted(by_bucket)
  weight = np.array([len(by_bucket[b]) * b for b in buckets], np.float64)
  orders = {b: list(rng.permutation(len(by_bucket[b]))) for b in buckets}
  for _ in range(steps):
    b = buckets[rng.choice(len(buckets), p=weight / weight.sum())]
    rows = []
    while len(rows) < ROWS[b]:
      if not orders[b]:
        orders[b] = list(rng.permutation(len(by_bucket[b])))
      rows.append(by_bucket[b][orders[b].pop()])
    yield b, rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--examples", type=int, default=14000)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--warmup", type=int, default=60)
  parser.add_argument("--save_every", type=int, default=0,
                      help="also write the model as of every this-many steps to OUT/step_N")
  args = parser.parse_args(argv)

  start = time.time()
  tokenizer = tiny.load_tiny_tokenizer()
  by_bucket, skills = build_data(args.seed, args.examples, tokenizer)
  print(f"curriculum: {dict(skills)} pairs, buckets "
        f"{ {b: len(v) for b, v in sorted(by_bucket.items())} } "
        f"({time.time() - start:.0f} s)", flush=True)

  config = tiny.tiny_config(num_heads=4, num_kv_heads=2, head_dim=64, attention_block_size=0)
  model = init_model(config, seed=args.seed)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.learning_rate, min(args.warmup, args.steps // 2), args.steps, end_value=args.learning_rate / 20)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01))
  step = SFTStep(model, tx)
  state = step.init_state(model)
  rng = np.random.default_rng(args.seed)

  curve, window = [], collections.defaultdict(list)
  for i, (length, rows) in enumerate(batches(by_bucket, args.steps, rng)):
    batch = make_sft_batch([r[0] for r in rows], [r[1] for r in rows],
                           pad_id=tiny.PAD_ID, length=length)
    state, metrics = step(state, batch)
    window["loss"].append(float(metrics["loss"]))
    for (_, _, skill), nll, count in zip(rows, np.asarray(metrics["row_nll"]),
                                         np.asarray(metrics["row_tokens"])):
      window[skill + "_nll"].append(float(nll))
      window[skill + "_tokens"].append(float(count))
    if (i + 1) % 25 == 0 or i + 1 == args.steps:
      loss = float(np.mean(window["loss"]))
      by_skill = {s: round(sum(window[s + "_nll"]) / max(sum(window[s + "_tokens"]), 1), 4)
                  for s in curriculum.SKILLS}
      curve.append({"step": i + 1, "loss": round(loss, 4), **by_skill})
      print(f"step {i + 1}/{args.steps}  loss {loss:.4f}  "
            + "  ".join(f"{s} {v:.4f}" for s, v in by_skill.items())
            + f"  ({time.time() - start:.0f} s)", flush=True)
      window.clear()
    if args.save_every and (i + 1) % args.save_every == 0 and i + 1 < args.steps:
      save_hf(step.model(state), os.path.join(args.out, f"step_{i + 1}"), dtype=jnp.bfloat16,
              tokenizer=tokenizer)

  trained = step.model(state)
  save_hf(trained, args.out, dtype=jnp.bfloat16, tokenizer=tokenizer)
  info = {
      "script": "scripts/build_demo_model.py",
      "seed": args.seed, "steps": args.steps, "examples": args.examples,
      "learning_rate": args.learning_rate, "warmup": args.warmup,
      "buckets": {str(b): ROWS[b] for b in BUCKETS},
      "curriculum": {"skills": dict(skills), "demo_thin_ice": curriculum.DEMO_THIN_ICE,
                     "demo_lake": curriculum.DEMO_LAKE,
                     "pretraining_thin_ice": curriculum.PRETRAINING_THIN_ICE,
                     "explore": curriculum.EXPLORE, "read_error": curriculum.READ_ERROR},
      "parameters": config.num_params(),
      "loss_curve": curve,
      "seconds": round(time.time() - start),
      "versions": {"jax": jax.__version__, "optax": optax.__version__},
  }
  atomic_write_text(os.path.join(args.out, "build_info.json"), json.dumps(info, indent=2))
  print(f"wrote {args.out} ({math.ceil(time.time() - start)} s)")


if __name__ == "__main__":
  main()
