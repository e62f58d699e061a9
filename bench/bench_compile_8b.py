"""Compile (without running) the Qwen3-8B consolidation step for an 8-device mesh.

Simulated CPU devices stand in for 8 accelerators; XLA's memory analysis of the
SPMD-partitioned program gives the per-device footprint. Shapes are the paper's: 64 games
per step with up to 5 prefixes each (320 rows), a teacher input of 8,192 knowledge tokens
plus a 5-turn prefix plus a 1,024-token response, split into micro-batches of one row per
device by default. Float32 master weights and AdamW state for the student, bf16 teacher,
bf16 compute, rematerialised layers (a scan over layers), blockwise attention.

With ``--knowledge_texts K`` (the paper's K = 10) it also compiles the step the way a round
runs it with the teacher's knowledge-prefix cache (`Trainer.knowledge_prefix`,
``train_step(teacher_prefix=)``): the K texts' keys and values over ``--knowledge`` slots
per layer are an argument, sharded like the weights (heads over tp, slots over fsdp), and
the teacher computes only prefix + response per row. Both programs' per-device memory is
printed side by side, with the caches' own bytes per device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/bench_compile_8b.py \
      [--fsdp 8 --tp 1] [--micro_rows 8] [--prefix 1024] [--attention_block 512] \
      [--knowledge_texts 10 [--skip_whole]]
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
from oel_jax.teacher_prefix import PrefixKV
from oel_jax.train import DistillBatch, TrainConfig, TrainState, Trainer

GiB = 2 ** 30
GB = 10 ** 9


def compile_step(trainer, state, teacher, batch, prefix_kv=None):
  """Compiles the step; returns its memory analysis and the seconds it took."""
  start = time.perf_counter()
  compiled = trainer.lower(state, teacher, batch, prefix_kv).compile()
  return compiled.memory_analysis(), time.perf_counter() - start


def total_bytes(mem) -> int:
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)


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
  parser.add_argument("--knowledge_texts", type=int, default=0,
                      help="also compile the step with this many cached knowledge prefixes "
                           "of --knowledge slots (the paper: 10); 0: only today's whole rows")
  parser.add_argument("--tpu", default="",
                      help="compile for this TPU topology's first data x fsdp x tp devices "
                           "(e.g. v5p:2x2x2; compile-only, no TPU needed, but libtpu must be "
                           "installed) instead of simulated CPU devices")
  parser.add_argument("--skip_whole", action="store_true",
                      help="with --knowledge_texts, compile only the cached step")
  args = parser.parse_args()

  mesh_config = parallel.MeshConfig(data=args.data, fsdp=args.fsdp, tp=args.tp)
  devices = None
  if args.tpu:
    from tpu_compile import tpu_devices  # pylint: disable=import-outside-toplevel
    devices = tpu_devices(args.tpu)[:args.data * args.fsdp * args.tp]
  mesh = parallel.make_mesh(mesh_config, devices=devices)
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
  where = f"TPU {args.tpu}, compile-only" if args.tpu else "simulated CPU devices"
  print(f"Qwen3-8B consolidation step on mesh {dict(mesh.shape)} ({where}); "
        f"{args.rows} rows in {micro} micro-batches of {args.micro_rows}; student "
        f"{ts} tokens, teacher {tt} tokens, response {r}; {args.layers} layers, attention "
        f"block {args.attention_block}; jax {jax.__version__}", flush=True)
  runs = {}  # name -> (memory analysis, extra argument bytes per device named apart)
  if not (args.knowledge_texts and args.skip_whole):
    mem, seconds = compile_step(trainer, state, teacher, batch)
    print(f"whole teacher rows ({tt} tokens): compiled in {seconds:.0f} s", flush=True)
    runs["whole teacher rows"] = mem
  cache_per_device = 0
  if args.knowledge_texts:
    # The round's cache: per layer keys and values [C, K, P, D] in the compute dtype,
    # placed as `Trainer.knowledge_prefix` places them; the teacher rows keep what follows.
    c, tc = args.knowledge_texts, args.prefix + args.response
    kv = jax.ShapeDtypeStruct((c, config.num_kv_heads, args.knowledge, config.head_dim),
                              config.compute_dtype, sharding=trainer.prefix_sharding)
    prefix_kv = PrefixKV(k=(kv,) * config.num_layers, v=(kv,) * config.num_layers)
    cached = batch.replace(teacher_ids=i32(args.rows, tc), teacher_mask=i32(args.rows, tc),
                           teacher_context=i32(args.rows),
                           teacher_prefix_len=i32(args.rows))
    cache_bytes = 2 * config.num_layers * kv.size * kv.dtype.itemsize
    cache_per_device = cache_bytes // (args.fsdp * args.tp)  # heads over tp, slots over fsdp
    mem, seconds = compile_step(trainer, state, teacher, cached, prefix_kv)
    print(f"cached knowledge ({c} texts x {args.knowledge} slots; teacher rows {tc} tokens): "
          f"compiled in {seconds:.0f} s; the caches hold {cache_bytes / GiB:.2f} GiB, "
          f"{cache_per_device / GiB:.2f} GiB per device", flush=True)
    runs[f"{c} cached knowledge prefixes"] = mem

  names = list(runs)
  print("| per device GiB | " + " | ".join(names) + " |")
  print("|---|" + "---|" * len(names))
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes"):
    label = field.replace("_size_in_bytes", "")
    if label == "argument" and args.knowledge_texts:
      label = "arguments (with the caches, where passed)"
    print(f"| {label} | " +
          " | ".join(f"{getattr(runs[n], field) / GiB:.2f}" for n in names) + " |")
  if args.knowledge_texts:
    print("| of which the knowledge caches | " +
          " | ".join(f"{cache_per_device / GiB:.2f}" if "cached" in n else "-" for n in names)
          + " |")
  print("| total (arguments + outputs + temporaries - aliased) | " +
        " | ".join(f"**{total_bytes(runs[n]) / GiB:.2f}**" for n in names) + " |")
  for name in names:
    total = total_bytes(runs[name])
    for device, capacity in (("95 GiB (TPU v5p)", 95 * GiB), ("80 GB", 80 * GB)):
      print(f"{name}: fits {device}: {'yes' if total <= capacity else 'no'}, "
            f"{(capacity - total) / GiB:+.2f} GiB to spare")


if __name__ == "__main__":
  main()
