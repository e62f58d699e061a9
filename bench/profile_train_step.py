"""Where the consolidation step's time goes on this machine, kernel by kernel.

The step of `bench_train_step.py` (Qwen3-0.6B widths, few layers, full vocabulary, bf16
compute, float32 master weights, bf16 teacher, top-256 reverse KL, AdamW), run a few times
under `jax.profiler.trace`. XLA:CPU records one event per kernel (thunk) it runs, named as the
compiled HLO's instruction; this script sums them by instruction, finds each instruction in
the compiled program (its opcode, whether it is a matmul: a YNNPACK/oneDNN fusion or a
dot, and its JAX name) and prints:

- the step's wall time and the kernels' total (the rest: the runtime between kernels);
- the time by kind (matmuls, elementwise/reduction fusions, copies and transposes, gathers
  and scatters, ...) and by part of the step (forward, backward, loss, optimizer), from the
  instruction's JAX name stack;
- the largest non-matmul kernels, with their shapes and names.

  python bench/profile_train_step.py [--layers 2] [--batch 4] [--prompt 128] [--response 128]
      [--before]  # the program before session 12's bf16 loss head and backward matmuls
      [--before14]  # before session 14's bf16 gradient tile and optimizer re-formulation
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

from bench_step_efficiency import patched
from bench_step_precision import before
from machine import matmul_rate
from step_inputs import add_step_arguments, random_step_batch, random_step_models
from oel_jax.train import TrainConfig, Trainer

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) (\S+?)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_MATMUL_OPS = ("dot", "convolution")


def program_instructions(hlo_text: str) -> dict[str, dict]:
  """Every instruction of the compiled program by name: its opcode, result type, the
  computation it calls, its JAX name and whether it is (or fuses) a matmul."""
  out, fused_dots, current, types = {}, {}, None, {}
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line and "(" in line:
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, result, opcode, rest = match.groups()
    types[name] = result.split("[")[0]
    if opcode in _MATMUL_OPS or "__onednn$matmul" in rest:
      operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
      fused_dots[current] = fused_dots[name] = "x".join(types.get(o, "?") for o in operands[:2])
    op_name = _OP_NAME.search(rest)
    calls = _CALLS.search(rest)
    out[name] = dict(opcode=opcode, result=result, computation=current,
                     calls=calls.group(1) if calls else None,
                     op_name=op_name.group(1) if op_name else "")
  for name, inst in out.items():
    inst["matmul"] = (inst["opcode"] in _MATMUL_OPS or inst["calls"] in fused_dots or
                      inst["opcode"] == "custom-call" and "matmul" in inst["result"])
    inst["matmul_types"] = fused_dots.get(inst["calls"]) or fused_dots.get(name, "")
  return out


def kind(name: str, inst: dict | None) -> str:
  """A kernel's kind, for the breakdown."""
  if name.startswith("ynn_fusion") or (inst and inst["matmul"]):
    types = inst["matmul_types"] if inst else ""
    return f"matmul {types}".strip()
  if inst is None:
    return "unmatched"
  op = inst["opcode"]
  if op == "fusion":
    body = inst["calls"] or ""
    for word, label in (("transpose", "transpose / copy"), ("copy", "transpose / copy"),
                        ("gather", "gather / scatter"), ("scatter", "gather / scatter"),
                        ("reduce", "reduction fusion"),
                        ("dynamic-update-slice", "dynamic-update-slice"),
                        ("dynamic_update_slice", "dynamic-update-slice"),
                        ("dynamic-slice", "dynamic-slice"), ("dynamic_slice", "dynamic-slice"),
                        ("convert", "elementwise fusion"), ("concatenate", "concatenate")):
      if word in name or word in body:
        return label
    return "elementwise fusion"
  if op in ("copy", "transpose"):
    return "transpose / copy"
  if op in ("while", "conditional", "call"):
    return "control flow"
  return op


def source_area(op_name: str) -> str:
  """Which part of the step a kernel belongs to, from its JAX name stack (the compiled
  program keeps no source lines): the loss's chunk loops, the model's backward (transposed
  JVP) or forward pass, and the rest (gradient sums, the optimizer, the finite check)."""
  if "while/body/closed_call" in op_name or "ch,vh->cv" in op_name:
    return "loss (chunked logits, top-k, divergence; both passes)"
  if "transpose(jvp" in op_name:
    return "backward pass (model)"
  if "jvp(" in op_name:
    return "forward passes (student, teacher)"
  if op_name.startswith("jit(step)/"):
    return "optimizer, gradient sums, finite check"
  return "unnamed (parameters' copies, layout)"


def main():
  parser = argparse.ArgumentParser()
  add_step_arguments(parser, steps=2)
  parser.add_argument("--top", type=int, default=20)
  parser.add_argument("--before", action="store_true",
                      help="profile the pre-session-12 program (float32 loss head and "
                           "backward matmuls; bench_step_precision.before)")
  parser.add_argument("--before14", action="store_true",
                      help="profile the program before session 14's loss gradient tile in "
                           "bf16 and optimizer re-formulation (bench_step_efficiency.patched)")
  args = parser.parse_args()
  rate = matmul_rate()
  print(f"machine: {os.cpu_count()} cores; bf16 matmul {rate / 1e9:.0f} GFLOP/s; jax "
        f"{jax.__version__}; load average {os.getloadavg()[0]:.1f}")
  config, student, teacher = random_step_models(args)
  batch = random_step_batch(args)
  b, p, kn, r = args.batch, args.prompt, args.knowledge, args.response
  trainer = Trainer(student, TrainConfig(learning_rate=1e-6, k=256))
  state = trainer.init_state(student)
  teacher_params = trainer.teacher_params(teacher)
  context = (before() if args.before else patched(True, True) if args.before14 else
             contextlib.nullcontext())
  with context:
    hlo = trainer.lower(state, teacher_params, batch).compile().as_text()
    state, _ = trainer.train_step(state, teacher_params, batch)  # compile and warm up
  instructions = program_instructions(hlo)

  folder = tempfile.mkdtemp(prefix="profile_train_step_")
  walls = []
  with jax.profiler.trace(folder):
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, teacher_params, batch)
      walls.append(time.perf_counter() - start)
  data = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
  per_kernel = collections.Counter()
  for plane in data.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if event.name.startswith(("end: ", "ThreadpoolListener", "ThunkExecutor")):
          continue  # markers, and the executor's span around the kernels
        inst = instructions.get(event.name)
        if inst and inst["opcode"] in ("while", "conditional", "call"):
          continue  # spans around their bodies' kernels, which are counted
        per_kernel[event.name] += event.duration_ns / 1e9 / args.steps
  step = min(walls)
  kernels = sum(per_kernel.values())
  print(f"model: Qwen3-0.6B widths, {args.layers} layers, vocab {config.vocab_size}; batch {b}, "
        f"prompt {p}, knowledge {kn}, response {r}; step {step:.2f} s wall (best of "
        f"{args.steps}), kernels {kernels:.2f} s per step (summed over threads)")

  by_kind, by_area = collections.Counter(), collections.Counter()
  for name, seconds in per_kernel.items():
    inst = instructions.get(name)
    by_kind[kind(name, inst)] += seconds
    by_area[source_area(inst["op_name"]) if inst else "unmatched"] += seconds
  by_both = collections.Counter()
  for name, seconds in per_kernel.items():
    inst = instructions.get(name)
    by_both[(source_area(inst["op_name"]) if inst else "unmatched", kind(name, inst))] += seconds
  for title, table in (("kind (matmuls by operand types)", by_kind), ("part of the step", by_area),
                       ("part, kind", by_both)):
    print(f"\n| {title} | s per step | share of kernel time |")
    print("|---|---|---|")
    for key, seconds in table.most_common(25):
      key = " / ".join(key) if isinstance(key, tuple) else key
      print(f"| {key} | {seconds:.3f} | {seconds / kernels:.1%} |")

  print(f"\nLargest non-matmul kernels (s per step):")
  print("| kernel | kind | result | JAX name | s | share |")
  print("|---|---|---|---|---|---|")
  shown = 0
  for name, seconds in per_kernel.most_common():
    inst = instructions.get(name)
    k = kind(name, inst)
    if k.startswith("matmul"):
      continue
    result = inst["result"][:60] if inst else "?"
    print(f"| {name} | {k} | {result} | {inst['op_name'][-60:] if inst else '?'} | {seconds:.3f} | "
          f"{seconds / kernels:.1%} |")
    shown += 1
    if shown == args.top:
      break


if __name__ == "__main__":
  main()
