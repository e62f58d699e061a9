"""Device meshes with axes (data, fsdp, tp) and placing parameters on them.

Every parameter carries a partition spec over these axis names (see
`oel_jax.models.qwen3`); `data` and `fsdp` split the batch, `fsdp` also shards
parameters and optimizer state, and `tp` splits heads and MLP width.

Host data and the mesh, on one process or several (`oel_jax.distributed`): every process
holds the same host values (the same games, the same batches), so `place` builds a global
array from them with each process filling only its own devices' shards, and `to_host` brings
a global array back whole to every process.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from oel_jax import settings

AXES = ("data", "fsdp", "tp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; -1 on one axis takes all remaining devices."""

  data: int = settings.integer(1, minimum=-1)
  """Pure data parallelism (parameters replicated across it)."""
  fsdp: int = settings.integer(-1, minimum=-1)
  """Fully sharded data parallelism: batch and parameters split along it."""
  tp: int = settings.integer(1, minimum=-1)
  """Tensor parallelism: attention heads and MLP width split along it."""

  def __post_init__(self):
    settings.check(self)

  def sizes(self) -> dict[str, int]:
    """The axis sizes as given (-1 unresolved)."""
    return {"data": self.data, "fsdp": self.fsdp, "tp": self.tp}

  def cross_checks(self, at: settings.At) -> list[str]:
    """Sizes are positive, or -1 on at most one axis."""
    sizes = self.sizes()
    if not at.ok(*AXES):
      return []
    if 0 in sizes.values() or list(sizes.values()).count(-1) > 1:
      return [f"{at.path}: axis sizes must be positive or -1 (at most one), got {sizes}"]
    return []

  def resolve(self, num_devices: int) -> dict[str, int]:
    """The axis sizes over ``num_devices`` devices, the -1 axis resolved.

    Raises:
      ValueError: the fixed axes do not divide the devices, or need another number of them.
    """
    sizes = self.sizes()
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
      if num_devices % fixed:
        raise ValueError(f"{sizes}: {num_devices} devices do not divide by the fixed axes "
                         f"(product {fixed})")
      sizes = {a: (num_devices // fixed if v == -1 else v) for a, v in sizes.items()}
    if math.prod(sizes.values()) != num_devices:
      raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have "
                       f"{num_devices}")
    return sizes


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes (data, fsdp, tp)."""
  config = config or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  sizes = config.resolve(len(devices))
  return Mesh(np.asarray(devices).reshape([sizes[a] for a in AXES]), AXES)


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


def place(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """``value`` as a global array with ``sharding``.

  A host value (a NumPy array, or an array on this process's devices) must be the same on
  every process; each process fills only the shards of its own devices from it, so nothing
  crosses between hosts (`jax.device_put` would also gather every process's copy to check
  that they agree). An array already spread over several processes is resharded.
  """
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return jax.device_put(value, sharding)
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(value: jax.Array) -> np.ndarray:
  """The whole of ``value`` as a NumPy array, on every process (an all-gather when its
  shards are spread over several processes)."""
  if value.is_fully_addressable or value.is_fully_replicated:
    return np.asarray(value)
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places every parameter of `model` on `mesh` by its partition spec (in place)."""
  state = nnx.state(model)
  for path, variable in nnx.to_flat_state(state):
    sharding = param_sharding(path, variable, mesh)
    variable.set_value(place(variable.get_value(), sharding))
  nnx.update(model, state)
  return model
