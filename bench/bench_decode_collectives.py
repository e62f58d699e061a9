"""Collective bytes per decode step of the sampler on a mesh, against the weights' bytes.

Compiles (without running) `Sampler`'s generate program for abstract Qwen3 weights placed
on a mesh of simulated CPU devices, finds the decode loop in the compiled HLO
(`oel_jax.sampling.decode_step_collectives`) and sums, per device, the bytes of the
collectives one decode step runs (the costliest branch of each conditional). Weight
gathers (`oel_jax.sampling.weight_gathers`) would show as all-gathers the size of a weight
matrix; the weights' bytes are those of the whole model and of one device's share of it.

Default model: Qwen3-8B's widths and vocabulary with 2 layers (the per-layer collectives
repeat in each layer; the LM head's and the sampling's come once), bf16 weights and compute.

  python bench/bench_decode_collectives.py [--layers 2] [--rows 64] \
      [--meshes 1,8,1 1,4,2 2,2,2 1,1,8]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from oel_jax import parallel  # noqa: E402
from oel_jax.models import PRESETS, abstract_model  # noqa: E402
from oel_jax.sampling import Sampler, decode_step_collectives, weight_gathers  # noqa: E402

MB = 10 ** 6


def abstract_sharded_model(config, mesh):
  """The model with abstract weights carrying their mesh shardings (nothing allocated)."""
  model = abstract_model(config)
  state = nnx.state(model)
  for path, variable in nnx.to_flat_state(state):
    sharding = parallel.param_sharding(path, variable, mesh)
    value = variable.get_value()
    variable.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
  nnx.update(model, state)
  return model


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="Qwen3-8B")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--new", type=int, default=256)
  parser.add_argument("--meshes", nargs="+", default=["1,8,1", "1,4,2", "2,2,2", "1,1,8"],
                      help="data,fsdp,tp per mesh")
  parser.add_argument("--tpu", default="",
                      help="compile for this TPU topology's devices (e.g. v5e:2x4; "
                           "compile-only, no TPU needed, but libtpu must be installed) "
                           "instead of simulated CPU devices")
  args = parser.parse_args()
  config = PRESETS[args.preset].replace(num_layers=args.layers, param_dtype=jnp.bfloat16,
                                        compute_dtype=jnp.bfloat16)
  print(f"{args.preset} widths, {args.layers} layers, bf16; {args.rows} rows, prompt "
        f"{args.prompt}, {args.new} new tokens; jax {jax.__version__}, "
        + (f"XLA:TPU {args.tpu} (compile-only)" if args.tpu else "XLA:CPU, 8 simulated devices")
        + "; bytes per device")
  devices = None
  if args.tpu:
    from tpu_compile import tpu_devices  # pylint: disable=import-outside-toplevel
    devices = tpu_devices(args.tpu)
  print("| mesh | weights (all) MB | weights per device MB | collective MB per step | "
        "share of weights per device | weight all-gathers | collectives per step (ops) |")
  print("|---|---|---|---|---|---|---|")
  for spec in args.meshes:
    data, fsdp, tp = map(int, spec.split(","))
    mesh = parallel.make_mesh(parallel.MeshConfig(data=data, fsdp=fsdp, tp=tp),
                              devices=None if devices is None else devices[:data * fsdp * tp])
    model = abstract_sharded_model(config, mesh)
    params = nnx.state(model)
    weights = sum(math.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(params))
    per_device = weights / (fsdp * tp)
    sampler = Sampler(model, eos_ids=[0], pad_id=0, max_seq_len=args.prompt + args.new,
                      mesh=mesh)
    start = time.perf_counter()
    hlo = sampler.lower(args.rows, args.prompt, args.new).compile().as_text()
    seconds = time.perf_counter() - start
    collectives, step_bytes = decode_step_collectives(hlo)
    gathers = weight_gathers(collectives, params, mesh)
    ops = collections.Counter(c.collective for c in collectives)
    print(f"| data {data}, fsdp {fsdp}, tp {tp} | {weights / MB:,.0f} | {per_device / MB:,.0f} "
          f"| {step_bytes / MB:,.2f} | {step_bytes / per_device:.2%} | {len(gathers)} | "
          f"{', '.join(f'{n} {op}' for op, n in sorted(ops.items()))} |", flush=True)
    biggest = sorted(collectives, key=lambda c: -c.collective_bytes)[:3]
    print("    largest: " + "; ".join(
        f"{c.collective} {'+'.join(f'{a.dtype}{list(a.shape)}' for a in c.results)} "
        f"{c.collective_bytes / MB:.2f} MB" for c in biggest) + f" (compiled in {seconds:.0f} s)",
        flush=True)


if __name__ == "__main__":
  main()
