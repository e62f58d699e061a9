"""Streaming safetensors reading and writing, one tensor at a time.

Our own reader (rather than `safetensors.safe_open`) because it memory-maps bfloat16
tensors straight into NumPy (via ml_dtypes, which JAX ships) and checks a file's header
against its size up front, so a truncated download fails with the file named before
any tensor is placed. The writer streams: the header is computed from shapes alone and
each tensor is fetched only when its bytes are written. Format:
https://github.com/huggingface/safetensors#format
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from oel_jax.atomic_write import atomic_open
from oel_jax.errors import InputError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# A header larger than this is corrupt, not a model (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


class CheckpointError(InputError):
  """A checkpoint that does not hold what it should; the message names the file."""


class SafetensorsError(CheckpointError):
  """A safetensors file that cannot be read as described; the message names the file."""


class SafetensorsFile:
  """Lazily readable tensors of one `.safetensors` file (memory-mapped)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      size = os.path.getsize(self.path)
    except OSError as e:
      raise SafetensorsError(f"{self.path}: cannot open ({e.strerror})") from None
    with open(self.path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise SafetensorsError(f"{self.path}: truncated (no 8-byte header length)")
      (header_len,) = struct.unpack("<Q", prefix)
      if header_len > _MAX_HEADER or 8 + header_len > size:
        raise SafetensorsError(
            f"{self.path}: truncated or corrupt (header length {header_len}, file size {size})")
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{self.path}: header is not a JSON object")
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + header_len
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    data_len = size - self._data_start
    for key, entry in header.items():
      try:
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise SafetensorsError(
            f"{self.path}: tensor '{key}' has a malformed header entry {entry!r}") from None
      if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise SafetensorsError(
            f"{self.path}: tensor '{key}' offsets {begin}..{end} do not fit shape {shape} "
            f"of {entry['dtype']}")
      if end > data_len:
        raise SafetensorsError(
            f"{self.path}: truncated: tensor '{key}' ends at byte {end} of the data section "
            f"but the file holds only {data_len} data bytes")
      self._entries[key] = (dtype, shape, begin, end)

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entries[key][1]

  def dtype(self, key: str) -> np.dtype:
    return self._entries[key][0]

  def read(self, key: str, box: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """The tensor, or the part of it ``box`` names, as a read-only memory-mapped view.

    Nothing is read until the view is used, and then only the file pages its elements lie
    in: a box of rows is one contiguous run of the file, a box of columns one run per row.

    Args:
      key: the tensor's name.
      box: ``(start, stop)`` along each dimension; None: the whole tensor.
    """
    dtype, shape, begin, end = self._entries[key]
    if box is not None and (len(box) != len(shape) or not all(
        0 <= lo <= hi <= n for (lo, hi), n in zip(box, shape))):
      raise ValueError(f"{self.path}: box {tuple(box)} does not fit tensor '{key}' of shape "
                       f"{shape}")
    if begin == end:
      whole = np.zeros(shape, dtype)
    else:
      whole = np.asarray(np.memmap(self.path, dtype=dtype, mode="r",
                                   offset=self._data_start + begin, shape=shape))
    if box is None:
      return whole
    return whole[tuple(slice(lo, hi) for lo, hi in box)]


def write(path: str | os.PathLike, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
          fetch: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None):
  """Writes a safetensors file atomically, fetching one tensor at a time.

  Args:
    path: destination; written to a temporary file in the same folder, then renamed.
    specs: name -> (shape, dtype), in file order.
    fetch: name -> the tensor (must match its spec); called once per name, in order.
    metadata: string metadata; transformers wants {"format": "pt"}.
  """
  path = os.fspath(path)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, (shape, dtype) in specs.items():
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
      raise ValueError(f"tensor '{name}': dtype {dtype} cannot be stored in safetensors")
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with atomic_open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, (shape, dtype) in specs.items():  # One at a time: a model need not fit in RAM.
      array = np.ascontiguousarray(fetch(name))
      if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f"tensor '{name}': got {array.shape} {array.dtype}, "
                         f"expected {tuple(shape)} {np.dtype(dtype)}")
      f.write(array.tobytes())


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int | None) -> list[list[str]]:
  """Groups tensor names, in order, into files of at most `max_bytes` (one file if None)."""
  shards: list[list[str]] = [[]]
  used = 0
  for name, nbytes in sizes:
    if max_bytes is not None and shards[-1] and used + nbytes > max_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += nbytes
  return shards
