"""Device meshes with axes (data, fsdp, tp) and placing parameters on them.

Every parameter carries a partition spec over these axis names (see
`oel_jax.models.qwen3`); `data` and `fsdp` split the batch, `fsdp` also shards
parameters and optimizer state, and `tp` splits heads and MLP width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; -1 on one axis takes all remaining devices."""

  data: int = 1
  """Pure data parallelism (parameters replicated across it)."""
  fsdp: int = -1
  """Fully sharded data parallelism: batch and parameters split along it."""
  tp: int = 1
  """Tensor parallelism: attention heads and MLP width split along it."""


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes (data, fsdp, tp)."""
  config = config or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  sizes = [config.data, config.fsdp, config.tp]
  for name, size in zip(AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh axis '{name}' has size {size}; use a positive size or -1")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {config}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into the fixed axes of "
                       f"{config} (product {known})")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def check_divisible(name: str, shape: Sequence[int], spec: P, mesh: Mesh):
  """Raises a ValueError naming the dimension and axis when `spec` cannot shard `shape`."""
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    parts = math.prod(mesh.shape[a] for a in axes)
    if size % parts:
      raise ValueError(
          f"{name}: dimension {dim} of shape {tuple(shape)} has size {size}, which mesh "
          f"axis {'x'.join(axes)} (size {parts}) does not divide")


def param_specs(model: nnx.Module) -> nnx.State:
  """The partition spec of every parameter, as a state tree."""
  return nnx.get_partition_spec(nnx.state(model))


def param_sharding(path: tuple, variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
  """The NamedSharding for one parameter, checked against the mesh."""
  spec = P(*(variable.get_metadata().get("out_sharding") or ()))
  check_divisible(".".join(map(str, path)), variable.shape, spec, mesh)
  return NamedSharding(mesh, spec)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places every parameter of `model` on `mesh` by its partition spec (in place)."""
  state = nnx.state(model)
  for path, variable in nnx.to_flat_state(state):
    sharding = param_sharding(path, variable, mesh)
    variable.set_value(jax.device_put(variable.get_value(), sharding))
  nnx.update(model, state)
  return model
