"""Hugging Face Qwen3 checkpoints <-> the NNX model.

The mapping is one table: each rule names a Hugging Face key pattern, the NNX parameter
path, the symbolic shape on each side and the transpose between them. Loading builds each
parameter from memory-mapped safetensors one at a time, each process reading only the part of
the checkpoint tensor that its own devices hold (rows and columns of the file, transposed and
reshaped as the rule says): on several hosts, none reads or holds the whole model. Exporting
fetches one parameter at a time into the file being written. Neither ever holds the whole
model twice in host memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from oel_jax import distributed, parallel
from oel_jax.atomic_write import atomic_write_text
from oel_jax.models import safetensors_io
from oel_jax.models.qwen3 import Qwen3, Qwen3Config, abstract_model
from oel_jax.models.safetensors_io import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """How one Hugging Face tensor becomes one NNX parameter."""

  hf_key: str
  """Hugging Face key; `{layer}` stands for the layer number."""
  nnx_path: str
  """Dotted NNX parameter path; `{layer}` as above."""
  hf_shape: tuple[str, ...]
  """Symbolic shape in the checkpoint (symbols from `_dims`)."""
  nnx_shape: tuple[str, ...]
  """Symbolic shape of our parameter."""
  transpose: tuple[int, ...] | None = None
  """Axis permutation applied to the checkpoint tensor before reshaping to nnx_shape."""


# PyTorch Linear weights are [out, in]; ours are [in, ...] with heads split out.
RULES: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", "embed", ("V", "H"), ("V", "H")),
    TensorRule("model.norm.weight", "final_norm.scale", ("H",), ("H",)),
    TensorRule("lm_head.weight", "lm_head", ("V", "H"), ("V", "H")),
    TensorRule("model.layers.{layer}.input_layernorm.weight",
               "layers.{layer}.input_norm.scale", ("H",), ("H",)),
    TensorRule("model.layers.{layer}.post_attention_layernorm.weight",
               "layers.{layer}.post_attn_norm.scale", ("H",), ("H",)),
    TensorRule("model.layers.{layer}.self_attn.q_proj.weight", "layers.{layer}.attn.q_proj",
               ("N*D", "H"), ("H", "N", "D"), (1, 0)),
    TensorRule("model.layers.{layer}.self_attn.k_proj.weight", "layers.{layer}.attn.k_proj",
               ("K*D", "H"), ("H", "K", "D"), (1, 0)),
    TensorRule("model.layers.{layer}.self_attn.v_proj.weight", "layers.{layer}.attn.v_proj",
               ("K*D", "H"), ("H", "K", "D"), (1, 0)),
    TensorRule("model.layers.{layer}.self_attn.o_proj.weight", "layers.{layer}.attn.o_proj",
               ("H", "N*D"), ("N", "D", "H"), (1, 0)),
    TensorRule("model.layers.{layer}.self_attn.q_norm.weight",
               "layers.{layer}.attn.q_norm.scale", ("D",), ("D",)),
    TensorRule("model.layers.{layer}.self_attn.k_norm.weight",
               "layers.{layer}.attn.k_norm.scale", ("D",), ("D",)),
    TensorRule("model.layers.{layer}.mlp.gate_proj.weight", "layers.{layer}.mlp.gate_proj",
               ("I", "H"), ("H", "I"), (1, 0)),
    TensorRule("model.layers.{layer}.mlp.up_proj.weight", "layers.{layer}.mlp.up_proj",
               ("I", "H"), ("H", "I"), (1, 0)),
    TensorRule("model.layers.{layer}.mlp.down_proj.weight", "layers.{layer}.mlp.down_proj",
               ("H", "I"), ("I", "H"), (1, 0)),
)


def _dims(config: Qwen3Config) -> dict[str, int]:
  c = config
  return {"V": c.vocab_size, "H": c.hidden_size, "I": c.intermediate_size,
          "N": c.num_heads, "K": c.num_kv_heads, "D": c.head_dim,
          "N*D": c.num_heads * c.head_dim, "K*D": c.num_kv_heads * c.head_dim}


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """One rule resolved for a config and layer."""

  hf_key: str
  nnx_path: tuple[str | int, ...]
  hf_shape: tuple[int, ...]
  nnx_shape: tuple[int, ...]
  transpose: tuple[int, ...] | None

  def to_nnx(self, array: np.ndarray) -> np.ndarray:
    if self.transpose is not None:
      array = np.transpose(array, self.transpose)
    return array.reshape(self.nnx_shape)

  def read(self, file: safetensors_io.SafetensorsFile,
           index: tuple[slice, ...] = ()) -> np.ndarray:
    """``self.to_nnx(file.read(self.hf_key))[index]``, from only the part of the checkpoint
    tensor that this part of our parameter comes from (a view into the file: nothing is read
    until it is used).

    Our parameter is the checkpoint tensor transposed, then with axes split (``N*D`` into
    ``N, D``): each axis of the transposed tensor feeds a group of our axes, and a position
    along it is the row-major position within the group. The slices ``index`` takes of a group
    bound a range of positions, which is what is read of that axis; the group's elements are
    then taken from it (a reshape when the group's inner axes are whole, as every partition
    spec of `oel_jax.models.qwen3` has them).
    """
    ranges = [range(*(index[a] if a < len(index) else slice(None)).indices(n))
              for a, n in enumerate(self.nnx_shape)]
    order = self.transpose or tuple(range(len(self.hf_shape)))
    box: list[tuple[int, int]] = [(0, 0)] * len(self.hf_shape)
    picks = []  # per transposed axis: positions within what is read, shaped as its group
    for axis, group in enumerate(self._groups(order)):
      flat = np.zeros((), np.int64)
      for a in group:
        flat = flat[..., None] * self.nnx_shape[a] + np.arange(
            ranges[a].start, ranges[a].stop, ranges[a].step)
      start = int(flat.min()) if flat.size else 0
      box[order[axis]] = (start, int(flat.max()) + 1 if flat.size else 0)
      picks.append(flat - start)
    part = np.transpose(file.read(self.hf_key, box), order)
    for axis in reversed(range(len(picks))):  # last first: earlier axes keep their numbers
      pick = picks[axis]
      split = part.shape[:axis] + pick.shape + part.shape[axis + 1:]
      if pick.size == part.shape[axis] and (pick.ravel() == np.arange(pick.size)).all():
        part = part.reshape(split)
      else:
        part = np.take(part, pick, axis=axis)
    return part

  def _groups(self, order: tuple[int, ...]) -> list[list[int]]:
    """Our axes, grouped by the axis of the transposed checkpoint tensor they split."""
    groups, axis = [], 0
    for size in (self.hf_shape[i] for i in order):
      group, product = [], 1
      while not group or product < size:
        group.append(axis)
        product *= self.nnx_shape[axis]
        axis += 1
      if product != size:
        raise AssertionError(f"{self.hf_key}: {self.nnx_shape} does not split {self.hf_shape}")
      groups.append(group)
    groups[-1] += range(axis, len(self.nnx_shape))  # trailing axes of size 1
    return groups

  def to_hf(self, array: np.ndarray) -> np.ndarray:
    if self.transpose is None:
      return array.reshape(self.hf_shape)
    permuted = tuple(self.hf_shape[i] for i in self.transpose)
    return np.transpose(array.reshape(permuted), np.argsort(self.transpose))


def tensor_mappings(config: Qwen3Config) -> list[TensorMapping]:
  """Every tensor of a checkpoint of this config, in a stable order."""
  dims = _dims(config)
  out = []

  def resolve(rule: TensorRule, layer: int | None):
    fmt = lambda s: s.format(layer=layer)
    path = tuple(int(p) if p.isdigit() else p for p in fmt(rule.nnx_path).split("."))
    out.append(TensorMapping(fmt(rule.hf_key), path, tuple(dims[d] for d in rule.hf_shape),
                             tuple(dims[d] for d in rule.nnx_shape), rule.transpose))

  for rule in RULES:
    if "{layer}" in rule.hf_key:
      continue
    if rule.nnx_path == "lm_head" and config.tie_word_embeddings:
      continue
    resolve(rule, None)
  for layer in range(config.num_layers):
    for rule in RULES:
      if "{layer}" in rule.hf_key:
        resolve(rule, layer)
  return out


def _checkpoint_files(path: str) -> dict[str, str]:
  """Maps every tensor key to the file that holds it."""
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})")
    files = {}
    for key, name in weight_map.items():
      file = os.path.join(path, name)
      if not os.path.exists(file):
        raise CheckpointError(f"{index}: tensor '{key}' is mapped to {name}, which is missing")
      files[key] = file
    return files
  if os.path.exists(single):
    return {key: single for key in safetensors_io.SafetensorsFile(single).keys()}
  raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                        "(only safetensors checkpoints are supported)")


def check_hf(path: str | os.PathLike) -> Qwen3Config:
  """Checks a Hugging Face Qwen3 checkpoint directory without reading any tensor.

  Reads `config.json` and every safetensors header: each tensor the architecture needs is
  present, in the file the index names, with the right shape, and lies within its (untruncated)
  file. What `load_hf` checks before it reads a byte of data.

  Returns:
    The checkpoint's `Qwen3Config`.

  Raises:
    CheckpointError: as `load_hf`.
  """
  path = os.fspath(path)
  config = Qwen3Config.from_hf(path)
  _validated_files(path, config)
  return config


def _validated_files(path: str, config: Qwen3Config
                     ) -> tuple[list[TensorMapping], dict[str, safetensors_io.SafetensorsFile]]:
  """The tensor mappings of `config` and, per HF key, its opened (header-checked) file."""
  key_files = _checkpoint_files(path)
  opened: dict[str, safetensors_io.SafetensorsFile] = {}
  mappings = tensor_mappings(config)
  expected = {m.hf_key for m in mappings}
  # Tied checkpoints sometimes store the (identical) head anyway; it is not read.
  ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
  extra = sorted(set(key_files) - expected - ignorable)
  if extra:
    raise CheckpointError(f"{key_files[extra[0]]}: unexpected tensor '{extra[0]}' "
                          f"({len(extra)} unexpected in all) for the architecture in "
                          f"{path}/config.json")
  missing = [m.hf_key for m in mappings if m.hf_key not in key_files]
  if missing:
    raise CheckpointError(f"{path}: missing tensor '{missing[0]}' ({len(missing)} missing "
                          f"in all) for the architecture in {path}/config.json")
  files = {}
  for m in mappings:
    name = key_files[m.hf_key]
    if name not in opened:
      opened[name] = safetensors_io.SafetensorsFile(name)
    file = files[m.hf_key] = opened[name]
    if m.hf_key not in file.keys():
      raise CheckpointError(f"{file.path}: the index maps tensor '{m.hf_key}' here but the "
                            "file does not hold it")
    if file.shape(m.hf_key) != m.hf_shape:
      raise CheckpointError(f"{file.path}: tensor '{m.hf_key}' has shape "
                            f"{file.shape(m.hf_key)}, expected {m.hf_shape} from config.json")
  return mappings, files


def load_hf(path: str | os.PathLike, *, dtype: Any = jnp.float32, compute_dtype: Any = None,
            mesh: Mesh | None = None, remat: bool = False) -> Qwen3:
  """Loads a Hugging Face Qwen3 checkpoint directory into a `Qwen3`.

  Args:
    path: a directory with `config.json` and `model.safetensors` or a sharded set
      with `model.safetensors.index.json`.
    dtype: parameter dtype (weights are cast tensor by tensor while loading).
    compute_dtype: activation/matmul dtype; defaults to `dtype`.
    mesh: place each parameter on this mesh by its partition spec, each process reading
      only the parts its own devices hold; None: the default device.
    remat: rematerialise decoder layers in the backward pass.

  Raises:
    CheckpointError: a missing, extra, misshapen or truncated tensor, or a config that
      is not Qwen3, with the key or field and the file named.
  """
  path = os.fspath(path)
  config = Qwen3Config.from_hf(path, param_dtype=dtype,
                               compute_dtype=compute_dtype or dtype, remat=remat)
  mappings, files = _validated_files(path, config)

  model = abstract_model(config)
  graphdef, state = nnx.split(model)
  variables = dict(nnx.to_flat_state(state))
  np_dtype = np.dtype(dtype)
  for m in mappings:
    variable = variables[m.nnx_path]
    file = files[m.hf_key]
    if mesh is None:
      array = jnp.asarray(np.ascontiguousarray(m.read(file), np_dtype))
    else:
      sharding = parallel.param_sharding(m.nnx_path, variable, mesh)
      array = jax.make_array_from_callback(m.nnx_shape, sharding,
                                           _shard_reader(m, file, np_dtype))
    variable.set_value(array)
  return nnx.merge(graphdef, state)


def _shard_reader(m: TensorMapping, file: safetensors_io.SafetensorsFile, dtype: np.dtype
                  ) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """What `jax.make_array_from_callback` calls for each of this process's devices: the
  device's part of the parameter, read from the file alone.

  Devices that hold the same part (replicas along the mesh's ``data`` axis) get the same
  array, read once.
  """
  parts: dict[tuple, np.ndarray] = {}

  def part(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in parts:
      parts[key] = np.ascontiguousarray(m.read(file, index), dtype)
    return parts[key]

  return part


def save_hf(model: Qwen3, path: str | os.PathLike, *, dtype: Any = None,
            max_shard_bytes: int | None = None, tokenizer: Any = None) -> None:
  """Writes `model` as a Hugging Face Qwen3 checkpoint directory.

  The result loads with `transformers.Qwen3ForCausalLM.from_pretrained(path)` (and vLLM).
  Each file is written to a temporary name and renamed; `config.json` (and the index,
  when sharded) come last, so a reader never sees a half-written checkpoint.

  On several processes (`oel_jax.distributed`) every process calls it: each tensor is
  gathered from the devices holding its shards, one at a time, and process 0 writes it.

  Args:
    model: the model to export.
    path: output directory (created if needed).
    dtype: tensor dtype in the files; defaults to the model's parameter dtype.
    max_shard_bytes: split into `model-0000i-of-0000n.safetensors` files of at most this
      size, with an index; None writes one `model.safetensors`.
    tokenizer: if given, saved beside the weights (`save_pretrained`).
  """
  path = os.fspath(path)
  _make_folder(path)
  config = model.config
  dtype = np.dtype(dtype or config.param_dtype)
  mappings = {m.hf_key: m for m in tensor_mappings(config)}
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  nbytes = [(key, math.prod(m.hf_shape) * dtype.itemsize) for key, m in mappings.items()]
  shards = safetensors_io.plan_shards(nbytes, max_shard_bytes)

  def gather(key: str) -> np.ndarray:  # on several processes, a collective
    return parallel.to_host(params[mappings[key].nnx_path].get_value())

  def fetch(key: str) -> np.ndarray:
    return mappings[key].to_hf(gather(key)).astype(dtype)

  if len(shards) == 1:
    names = [SINGLE_FILE]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, keys in zip(names, shards):
    specs = {k: (mappings[k].hf_shape, dtype) for k in keys}
    if distributed.is_writer():
      safetensors_io.write(os.path.join(path, name), specs, fetch)
    else:  # no file here, but each gather needs every process, in the writer's order
      for key in keys:
        gather(key)
  hf_config = config.to_hf()
  hf_config["torch_dtype"] = hf_config["dtype"] = dtype.name
  index = None
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(n for _, n in nbytes)},
             "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
  _finish_folder(path, hf_config, index, tokenizer)


@distributed.writer_only
def _make_folder(path: str) -> None:
  os.makedirs(path, exist_ok=True)


@distributed.writer_only
def _finish_folder(path: str, hf_config: dict[str, Any], index: dict[str, Any] | None,
                   tokenizer: Any) -> None:
  """What follows the weights: the index (or a stale one removed), the tokenizer, and
  config.json last, so that a reader never takes a half-written checkpoint for a whole one."""
  if index is not None:
    _write_json(os.path.join(path, INDEX_FILE), index)
  stale = SINGLE_FILE if index is not None else INDEX_FILE
  if os.path.exists(os.path.join(path, stale)):
    os.unlink(os.path.join(path, stale))
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  _write_json(os.path.join(path, "config.json"), hf_config)


def _write_json(file: str, obj: Any):
  atomic_write_text(file, json.dumps(obj, indent=2))
