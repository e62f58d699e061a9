"""What XLA:TPU makes of our programs, compiled here without a TPU, beside XLA:CPU's.

libtpu compiles for a TPU topology on a machine that has none (JAX's compile-only devices,
`jax.experimental.topologies`). This script compiles the same programs for such devices
and for this host's CPU, and prints what each compiled program does, from its HLO:

- ``decode``: `Sampler`'s generate program; for one decode step (the body of the loop that
  carries the KV cache) the kernels it runs, and every array of 1 MiB or more that a kernel
  reads, grouped into weights, the KV cache and the rest, against the weights' and the
  cache's own bytes. A ratio of 1.0 means each weight is read once per step, as the memory
  floor assumes. It also names the dots whose weight operand is not read in its stored
  dtype (converted first) and the multiply-accumulate types.
- ``step``: the consolidation train step; every dot (matmul) in the compiled program by
  operand types, so a float32 x float32 dot under bf16 compute shows up by name.

Nothing is timed: there is no TPU here. Needs libtpu (the version ``jax[tpu]`` pins for
this jax, e.g. ``pip install 'libtpu==0.0.42.*'`` for jax 0.10.2); no TPU is needed.

  python bench/tpu_compile.py decode [--topology v5e:2x2] [--layers 2] [--batch 16]
  python bench/tpu_compile.py step [--topology v5e:2x2] [--layers 2] [--batch 4] \
      [--prompt 128 --knowledge 128 --new 128]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from oel_jax import compiled_hlo, parallel  # noqa: E402
from oel_jax.models import PRESETS, abstract_model  # noqa: E402
from oel_jax.sampling import Sampler, decode_loop  # noqa: E402

MiB = 2 ** 20


def tpu_devices(topology: str) -> list:
  """Compile-only devices of a TPU topology (``v5e:2x2``, ``v5p:2x2x2``, ...)."""
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except RuntimeError as e:
    raise SystemExit(f"tpu_compile: cannot make TPU topology {topology!r} ({e}); install "
                     "libtpu, the version jax[tpu] pins for this jax (no TPU needed)") from e


def decode_reads(hlo: str, weight_sizes: set[int], cache_shape: tuple[int, ...]):
  """Per decode step: the kernels the loop body runs (by opcode), and the bytes its fused
  kernels read of arrays of 1 MiB or more, split into weights, the KV cache and the rest."""
  computations, loop = decode_loop(hlo)
  reads_of = compiled_hlo.kernel_reads(hlo)
  kernels, reads = collections.Counter(), collections.Counter()
  for name in loop:
    for inst in computations[name]:
      if inst.opcode in ("parameter", "get-tuple-element", "tuple", "constant", "bitcast"):
        continue
      kernels[inst.opcode] += 1
      if inst.opcode != "fusion" or not inst.called:
        continue
      for typ, size in reads_of.get(inst.called[0], []):
        if size < MiB:
          continue
        shape = tuple(int(d) for d in typ.split("[")[1].rstrip("]").split(",") if d)
        if math.prod(shape) in weight_sizes:
          reads["weights"] += size
        elif math.prod(shape) == math.prod(cache_shape):
          reads["cache"] += size
        else:
          reads[f"other {typ}"] += size
  return kernels, reads


def one_device_meshes(topology: str):
  """``(backend name, one-device mesh)`` for this host's CPU and for a chip of ``topology``."""
  for platform, devices in (("XLA:CPU", jax.devices("cpu")[:1]),
                            (f"XLA:TPU {topology}", tpu_devices(topology)[:1])):
    yield platform, parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=1, tp=1),
                                       devices=devices)


def abstract_sharded_model(config, mesh):
  """The model with abstract weights placed by their shardings on ``mesh``."""
  model = abstract_model(config)
  state = nnx.state(model)
  for path, variable in nnx.to_flat_state(state):
    value = variable.get_value()
    variable.set_value(jax.ShapeDtypeStruct(
        value.shape, value.dtype, sharding=parallel.param_sharding(path, variable, mesh)))
  nnx.update(model, state)
  return model


def decode(args):
  config = PRESETS[args.preset].replace(num_layers=args.layers, param_dtype=jnp.bfloat16,
                                        compute_dtype=jnp.bfloat16)
  print(f"{args.preset} widths, {args.layers} layers, bf16 weights and compute; batch "
        f"{args.batch}, prompt {args.prompt}, {args.new} new tokens; jax {jax.__version__}; "
        "one device each\n")
  for platform, mesh in one_device_meshes(args.topology):
    model = abstract_sharded_model(config, mesh)
    weights = {math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model))
               if len(p.shape) >= 2}
    weight_bytes = sum(math.prod(p.shape) * p.dtype.itemsize
                       for p in jax.tree.leaves(nnx.state(model)))
    sampler = Sampler(model, eos_ids=[0], pad_id=0, max_seq_len=args.prompt + args.new,
                      mesh=mesh)
    start = time.perf_counter()
    hlo = sampler.lower(args.batch, args.prompt, args.new).compile().as_text()
    seconds = time.perf_counter() - start
    rows = max(args.batch, sampler.min_batch_bucket)
    slots = args.prompt + args.new
    cache_shape = (rows, config.num_kv_heads, slots, config.head_dim)
    cache_bytes = 2 * config.num_layers * math.prod(cache_shape) * 2
    kernels, reads = decode_reads(hlo, weights, cache_shape)
    _, loop = decode_loop(hlo)
    loop_dots = [d for d in compiled_hlo.dots(hlo) if d.computation in _reachable(hlo, loop)]
    print(f"## {platform} (compiled in {seconds:.0f} s)")
    print(f"- kernels per decode step: {sum(kernels.values())} "
          f"({', '.join(f'{n} {op}' for op, n in kernels.most_common())})")
    print(f"- read per step by fusions: weights {reads['weights'] / MiB:,.1f} MiB of "
          f"{weight_bytes / MiB:,.1f} MiB ({reads['weights'] / weight_bytes:.2f}x); cache "
          f"{reads['cache'] / MiB:,.1f} MiB of {cache_bytes / MiB:,.1f} MiB "
          f"({reads['cache'] / cache_bytes:.2f}x)")
    for key, value in sorted(reads.items()):
      if key.startswith("other"):
        print(f"  - {key}: {value / MiB:,.1f} MiB")
    kinds = collections.Counter(d.types for d in loop_dots)
    fused_work = _dot_kernels_with_other_work(hlo, loop)
    print(f"- dots in the decode step: {len(loop_dots)} "
          f"({', '.join(f'{n} {k}' for k, n in kinds.most_common())}); kernels that run a "
          f"dot: {fused_work[0]}, of which {fused_work[1]} also compute other work in the same "
          f"kernel ({', '.join(sorted(fused_work[2])) or 'none'})")
    print()


_LAYOUT_OPS = {"parameter", "bitcast", "bitcast-convert", "convert", "reshape", "transpose",
               "copy", "constant", "broadcast", "fusion", "dot", "convolution", "tuple",
               "get-tuple-element", "slice", "custom-call"}


def _dot_kernels_with_other_work(hlo: str, loop) -> tuple[int, int, set[str]]:
  """(kernels of the decode step that run a dot, those of them that also compute something
  besides moving and converting data, the opcodes of that other work)."""
  computations = parallel.parse_hlo(hlo)
  with_dot = with_work = 0
  work = set()
  for name in loop:
    for inst in computations[name]:
      if inst.opcode != "fusion" or not inst.called:
        continue
      ops = {i.opcode for c in parallel.reachable(computations, inst.called[0])
             for i in computations[c]}
      if ops & {"dot", "convolution"}:
        with_dot += 1
        if ops - _LAYOUT_OPS:
          with_work += 1
          work |= ops - _LAYOUT_OPS
  return with_dot, with_work, work


def _reachable(hlo: str, roots) -> set[str]:
  computations = parallel.parse_hlo(hlo)
  seen = set()
  for root in roots:
    seen.update(parallel.reachable(computations, root))
  return seen


def step(args):
  """Compiles the train step for each platform and lists its dots by operand types."""
  # pylint: disable-next=import-outside-toplevel
  from oel_jax.train import DistillBatch, TrainConfig, TrainState, Trainer
  config = PRESETS[args.preset].replace(num_layers=args.layers, param_dtype=jnp.float32,
                                        compute_dtype=jnp.bfloat16)
  print(f"{args.preset} widths, {args.layers} layers, consolidation step: float32 master "
        f"weights, bf16 compute and teacher; batch {args.batch}, prompt {args.prompt}, "
        f"knowledge {args.knowledge}, response {args.new}; jax {jax.__version__}; one device "
        "each\n")
  for platform, mesh in one_device_meshes(args.topology):
    student = abstract_sharded_model(config, mesh)
    trainer = Trainer(student, TrainConfig(learning_rate=1e-6), mesh=mesh)
    params = nnx.state(student)
    teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16,
                                                          sharding=x.sharding), params)
    state = TrainState(params=params, opt_state=jax.eval_shape(trainer.tx.init, params),
                       step=jax.ShapeDtypeStruct((), jnp.int32))
    b, ts, r = args.batch, args.prompt + args.new, args.new
    tt = args.knowledge + ts
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    batch = DistillBatch(student_ids=i32(b, ts), student_mask=i32(b, ts),
                         teacher_ids=i32(b, tt), teacher_mask=i32(b, tt),
                         student_index=i32(b, r), teacher_index=i32(b, r),
                         response_mask=jax.ShapeDtypeStruct((b, r), jnp.float32))
    start = time.perf_counter()
    compiled = trainer.lower(state, teacher, batch).compile()
    seconds = time.perf_counter() - start
    found = compiled_hlo.dots(compiled.as_text())
    kinds = collections.Counter(d.types for d in found)
    print(f"## {platform} (compiled in {seconds:.0f} s)")
    print(f"- dots: {len(found)} ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})")
    for d in found:
      if all(compiled_hlo.dtype(o) == "f32" for o in d.operands):
        print(f"  - float32 x float32: {' x '.join(d.operands)} -> {d.result}  [{d.op_name}]")
    mem = compiled.memory_analysis()
    print(f"- compiled memory: arguments {mem.argument_size_in_bytes / MiB:,.0f} MiB, "
          f"temporaries {mem.temp_size_in_bytes / MiB:,.0f} MiB\n", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=("decode", "step"))
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--preset", default="Qwen3-0.6B")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=None, help="decode: 16; step: 4")
  parser.add_argument("--prompt", type=int, default=None, help="decode: 32; step: 128")
  parser.add_argument("--new", type=int, default=128,
                      help="decode: new tokens; step: response tokens")
  parser.add_argument("--knowledge", type=int, default=128, help="step: knowledge tokens")
  args = parser.parse_args()
  defaults = {"decode": (16, 32), "step": (4, 128)}[args.what]
  args.batch = defaults[0] if args.batch is None else args.batch
  args.prompt = defaults[1] if args.prompt is None else args.prompt
  {"decode": decode, "step": step}[args.what](args)


if __name__ == "__main__":
  main()
