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
import re
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


# --------------------------------------------------------------------------------------
# Collectives in compiled programs
# --------------------------------------------------------------------------------------

COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                  "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_CALLED = re.compile(
    r"\b(?:body|condition|calls|to_apply|true_computation|false_computation|"
    r"branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class HloArray:
  """One array type in HLO text."""

  dtype: str
  """HLO element type (f32, bf16, s32, ...)."""
  shape: tuple[int, ...]
  """Dimensions."""

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def bytes(self) -> int:
    return int(self.size * _DTYPE_BYTES.get(self.dtype, 1))


@dataclasses.dataclass(frozen=True)
class HloInstruction:
  """One instruction of a compiled HLO module, as much of it as the collective counts need."""

  name: str
  """Its name in the module."""
  opcode: str
  """all-gather, while, fusion, ..."""
  results: tuple[HloArray, ...]
  """The arrays it produces (several for a tuple)."""
  called: tuple[str, ...]
  """Computations it runs (a loop's body and condition, a fusion's, a branch's ...)."""
  group_size: int
  """Devices in each of a collective's replica groups (1 when the text names none)."""

  @property
  def collective(self) -> str | None:
    """Which of `COLLECTIVE_OPS` it is (the ``-done`` half of an asynchronous one), or None."""
    op = self.opcode.removesuffix("-done")
    return op if op in COLLECTIVE_OPS and not self.opcode.endswith("-start") else None

  @property
  def collective_bytes(self) -> int:
    """Per device, the size of the whole buffer a collective works on: what an all-gather
    assembles, what an all-reduce sums, what a reduce-scatter splits (its result times the
    group), what an all-to-all or a permute sends."""
    result = sum(a.bytes for a in self.results)
    return result * self.group_size if self.collective == "reduce-scatter" else result


def _arrays(text: str) -> tuple[HloArray, ...]:
  return tuple(HloArray(dtype, tuple(int(d) for d in dims.split(",") if d))
               for dtype, dims in _ARRAY.findall(text))


def parse_hlo(text: str) -> dict[str, list[HloInstruction]]:
  """The computations of an HLO module's text (``compiled.as_text()``), by name, and
  ``"ENTRY"`` for the entry computation."""
  computations: dict[str, list[HloInstruction]] = {}
  current = None
  for line in text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = computations.setdefault(match.group(1), [])
        if line.startswith("ENTRY"):
          computations["ENTRY"] = current
      continue
    if line.startswith("}"):
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, result_type, opcode, rest = match.groups()
    depth, end = 1, len(rest)  # the operand list ends at its matching parenthesis
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        end = i
        break
    called = tuple(c.strip().lstrip("%") for group in _CALLED.findall(rest[end:])
                   for c in group.strip("{}").split(",") if c.strip())
    current.append(HloInstruction(name, opcode, _arrays(result_type), called,
                                  _group_size(rest[end:])))
  return computations


def _group_size(attributes: str) -> int:
  """Devices per replica group, in any of the three ways HLO text writes the groups."""
  iota, listed = _IOTA_GROUPS.search(attributes), _LISTED_GROUPS.search(attributes)
  mesh = _MESH_GROUPS.search(attributes)
  if iota:  # [groups, size]<=[devices]
    return int(iota.group(1).split(",")[-1])
  if listed:  # {{0,1},{2,3}}
    return len(listed.group(1).split(","))
  if mesh:  # mesh['axis_0'=4,'axis_1'=2] {'axis_1'}: the named axes form a group
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", mesh.group(2)))
  return 1


def reachable(computations: dict[str, list[HloInstruction]], root: str) -> list[str]:
  """`root` and every computation it calls, directly or not."""
  seen, todo = [], [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.append(name)
    todo.extend(c for inst in computations[name] for c in inst.called)
  return seen


def collectives(computations: dict[str, list[HloInstruction]], root: str
                ) -> list[HloInstruction]:
  """The collectives `root` may run, in it and in everything it calls (every branch)."""
  return [inst for name in reachable(computations, root) for inst in computations[name]
          if inst.collective]


def collective_bytes(computations: dict[str, list[HloInstruction]], root: str) -> int:
  """Per device, the bytes of the collectives one run of `root` performs
  (`HloInstruction.collective_bytes`): of a conditional, its costliest branch; a loop
  inside counts once."""
  total = 0
  for inst in computations.get(root, []):
    if inst.collective:
      total += inst.collective_bytes
    elif inst.called:
      called = [collective_bytes(computations, c) for c in inst.called]
      total += max(called) if inst.opcode == "conditional" else sum(called)
  return total
