"""What a compiled program does, read from its optimized HLO text (``compiled.as_text()``):
the dots it multiplies and in which types, and the bytes each kernel reads of its inputs.

For comparing what XLA makes of one program on two backends (`bench/tpu_compile.py`
compiles ours for a TPU topology on a machine that has none) and for tests that a hot loop
reads each weight once. `oel_jax.parallel.parse_hlo` gives the computations and their
instructions' results; here each instruction's operands are looked up by name as well.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_HEAD = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_PARAMETER = re.compile(r"([\w.\-]+): ([a-z]+[0-9]*\[[0-9,]*\])")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z]+[0-9]*\[[0-9,]*\])?"
                          r"\S*\s+([a-z][a-z0-9\-]*)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_ARRAY = re.compile(r"^([a-z]+[0-9]*)\[([0-9,]*)\]$")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}

# Inside a fused kernel these produce each element from one element of their operand, so a
# gather or slice after them still reads only what it takes of the original array.
_PASS_THROUGH = ("bitcast", "bitcast-convert", "convert", "reshape")


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot or convolution of a compiled module."""

  computation: str
  """The computation that holds it (a fused kernel's, or a plain one)."""
  operands: tuple[str, ...]
  """Each operand's array type, e.g. ``bf16[16,1024]`` ("?" when not found)."""
  result: str
  """The result's array type."""
  op_name: str
  """The JAX name stack it came from (its ``op_name`` metadata; "" when none)."""

  @property
  def types(self) -> str:
    """``bf16 x bf16 -> f32``."""
    return " x ".join(dtype(o) for o in self.operands) + " -> " + dtype(self.result)


def dtype(array_type: str) -> str:
  """``bf16`` of ``bf16[16,1024]``."""
  return array_type.split("[")[0]


def array_bytes(array_type: str) -> int:
  """Bytes of an array type such as ``bf16[16,1024]`` (0 for a tuple or a token)."""
  match = _ARRAY.match(array_type)
  if not match:
    return 0
  shape = [int(d) for d in match.group(2).split(",") if d]
  return math.prod(shape) * _DTYPE_BYTES.get(match.group(1), 1)


def _instructions(hlo: str):
  """(computation, its parameters [(name, type)], instructions [(name, type, opcode,
  operand names, rest of the line)]) for every computation of the module."""
  current = None
  for line in hlo.splitlines():
    head = _HEAD.match(line)
    if head:
      if current:
        yield current
      current = (head.group(1), _PARAMETER.findall(head.group(2)), [])
      continue
    if current is None:
      continue
    if line.startswith("}"):
      yield current
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if match:
      name, result, opcode, rest = match.groups()
      operands = tuple(_OPERAND.findall(rest.split(")")[0]))
      current[2].append((name, result or "", opcode, operands, rest))
  if current:
    yield current


def dots(hlo: str) -> list[Dot]:
  """Every dot and convolution of the module, with its operands' types."""
  found = []
  for computation, parameters, instructions in _instructions(hlo):
    types = dict(parameters)
    for name, result, opcode, operands, rest in instructions:
      types[name] = result
      if opcode in ("dot", "convolution"):
        op_name = re.search(r'op_name="([^"]*)"', rest)
        found.append(Dot(computation, tuple(types.get(o) or "?" for o in operands), result,
                         op_name.group(1) if op_name else ""))
  return found


def kernel_reads(hlo: str) -> dict[str, list[tuple[str, int]]]:
  """For every computation, each parameter's type and the bytes a kernel running it reads of
  that parameter: the whole array, except only what a gather or dynamic-slice takes of it,
  and only the update of a buffer that a dynamic-update-slice writes in place. Applied to a
  fusion's computation, this is what the fused kernel reads of each of its inputs."""
  reads = {}
  for computation, parameters, instructions in _instructions(hlo):
    source = {}  # name -> the parameter whose elements it carries through
    types = dict(parameters)
    partial = collections.defaultdict(int)
    whole = set()
    for name, result, opcode, operands, _ in instructions:
      types[name] = result
      origins = [source.get(o, o) for o in operands]
      if opcode in _PASS_THROUGH and len(origins) == 1:
        source[name] = origins[0]
      elif opcode in ("gather", "dynamic-slice") and origins:
        partial[origins[0]] += array_bytes(result)
        whole.update(origins[1:])
      elif opcode == "dynamic-update-slice" and len(origins) > 1:
        partial[origins[0]] += 0  # the buffer, written in place
        whole.update(origins[1:])
      else:
        whole.update(origins)
    reads[computation] = [
        (typ, array_bytes(typ) if name in whole or name not in partial else partial[name])
        for name, typ in parameters]
  return reads
