"""Compile (without running) the Qwen3-8B consolidation step for an 8-device mesh.

Simulated CPU devices stand in for 8 accelerators; XLA's memory analysis of the
SPMD-partitioned program gives the per-device footprint. Shapes are the paper's: 64 games
per step with up to 5 prefixes each (320 rows), a teacher input of 8,192 knowledge tokens
plus a 5-turn prefix plus a 1,024-token response, split into micro-batches of one row per
device by default. Float32 master weights and AdamW state for the student, bf16 teacher,
bf16 compute, rematerialised layers (a scan over layers), blockwise attention.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/bench_compile_8b.py \
      [--fsdp 8 --tp 1] [--micro_rows 8] [--prefix 1024] [--attention_block 512]
"""

from __future__ import annotations

import argparse
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from flax import nnx

from oel_jax import parallel
from oel_jax.models import PRESETS, abstract_model
from oel_jax.train import DistillBatch, TrainConfig, TrainState, Trainer

GiB = 2 ** 30
GB = 10 ** 9


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--data", type=int, default=1)
  parser.add_argument("--fsdp", type=int, default=8)
  parser.add_argument("--tp", type=int, default=1)
  parser.add_argument("--rows", type=int, default=320)
  parser.add_argument("--micro_rows", type=int, default=8, help="rows per micro-batch")
  parser.add_argument("--knowledge", type=int, default=8192)
  parser.add_argument("--prefix", type=int, default=1024)
  parser.add_argument("--response", type=int, default=1024)
  parser.add_argument("--attention_block", type=int, default=512,
                      help="blockwise attention block size; 0: full score matrix")
  parser.add_argument("--layers", type=int, default=36,
                      help="fewer layers for quick scaling studies")
  args = parser.parse_args()

  mesh = parallel.make_mesh(parallel.MeshConfig(data=args.data, fsdp=args.fsdp, tp=args.tp))
  config = PRESETS["Qwen3-8B"].replace(param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                                        remat=True, num_layers=args.layers,
                                        attention_block_size=args.attention_block)
  student = abstract_model(config)
  micro = args.rows // args.micro_rows
  trainer = Trainer(student, TrainConfig(learning_rate=1e-6, micro_batches=micro), mesh=mesh)
  params = nnx.state(student)
  teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
  state = TrainState(params=params, opt_state=jax.eval_shape(trainer.tx.init, params),
                     step=jax.ShapeDtypeStruct((), jnp.int32))
  ts, tt, r = args.prefix + args.response, args.knowledge + args.prefix + args.response, \
      args.response
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  batch = DistillBatch(student_ids=i32(args.rows, ts), student_mask=i32(args.rows, ts),
                       teacher_ids=i32(args.rows, tt), teacher_mask=i32(args.rows, tt),
                       student_index=i32(args.rows, r), teacher_index=i32(args.rows, r),
                       response_mask=jax.ShapeDtypeStruct((args.rows, r), jnp.float32))
  print(f"Qwen3-8B consolidation step on mesh {dict(mesh.shape)} (simulated CPU devices); "
        f"{args.rows} rows in {micro} micro-batches of {args.micro_rows}; student "
        f"{ts} tokens, teacher {tt} tokens, response {r}; {args.layers} layers, attention "
        f"block {args.attention_block}; jax {jax.__version__}", flush=True)
  start = time.perf_counter()
  lowered = trainer.lower(state, teacher, batch)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  print(f"compiled in {time.perf_counter() - start:.0f} s")
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  print("| per device | GiB |")
  print("|---|---|")
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
               "temp_size_in_bytes"):
    print(f"| {name.replace('_size_in_bytes', '')} | {getattr(mem, name) / GiB:.2f} |")
  print(f"| total (arguments + outputs + temporaries - aliased) | {total / GiB:.2f} |")
  for name, capacity in (("95 GiB (TPU v5p)", 95 * GiB), ("80 GB", 80 * GB)):
    print(f"fits {name}: {'yes' if total <= capacity else 'no'}, "
          f"{(capacity - total) / GiB:+.2f} GiB to spare")


if __name__ == "__main__":
  main()
