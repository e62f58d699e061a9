"""Qwen3 decoder in Flax NNX.

The architecture of transformers' `Qwen3ForCausalLM`: token embedding, pre-norm decoder
layers (RMSNorm -> attention with per-head q/k RMSNorm applied before RoPE, grouped-query
attention -> residual; RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, tied or untied
LM head with float32 logits.

Shapes in docstrings: B batch, T new tokens, S cache slots, H hidden, N query heads,
K key/value heads, G = N / K, D head_dim, I MLP width, V vocabulary, L layers.

Parameter layouts are chosen for speed on every backend, not to mirror PyTorch:
projections are stored `[in, heads, head_dim]` / `[heads, head_dim, out]` so that heads
shard along the `tp` mesh axis, and the (un)embedding is stored vocabulary-major `[V, H]`
(XLA:CPU is several times faster at the LM head in that layout; see DESIGN.md section 7).
`oel_jax.models.hf` maps Hugging Face tensors to and from these layouts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from oel_jax.models import attention

# Mesh axis names used by every partition spec in the project (see oel_jax.parallel).
DATA, FSDP, TP = "data", "fsdp", "tp"

# Finite mask value: fully masked rows (padding queries) stay NaN-free.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """Architecture of a Qwen3 decoder plus the dtypes it runs in."""

  vocab_size: int
  """Rows of the embedding and LM head (V)."""
  hidden_size: int
  """Width of the residual stream (H)."""
  intermediate_size: int
  """Width of the SwiGLU MLP (I)."""
  num_layers: int
  """Number of decoder layers (L)."""
  num_heads: int
  """Query heads (N)."""
  num_kv_heads: int
  """Key/value heads (K); N must be a multiple of K."""
  head_dim: int
  """Per-head width (D); Qwen3 decouples it from hidden_size / num_heads."""
  rope_theta: float = 1_000_000.0
  """RoPE base: 1e6 for the Qwen3 base models, 5e6 for the Instruct-2507 ones."""
  rms_norm_eps: float = 1e-6
  """Epsilon inside every RMSNorm."""
  tie_word_embeddings: bool = True
  """Whether the LM head reuses the token embedding."""
  max_position_embeddings: int = 40_960
  """Longest context the checkpoint was trained for (recorded, not enforced)."""
  param_dtype: Any = jnp.float32
  """Dtype parameters are stored in (the optimizer's master copy when training)."""
  compute_dtype: Any = jnp.float32
  """Dtype of matmul inputs and activations; norms, softmax and logits stay float32."""
  attention_block_size: int = 512
  """Without a cache, sequences longer than this run blockwise attention
  (`oel_jax.models.attention`) with blocks of this many queries and keys, never holding the
  `[T, T]` score matrix; 0 always uses the plain attention."""
  remat: bool = False
  """Rematerialise each decoder layer in the backward pass (saves activation memory).

  Without a cache the layers then run as one `lax.scan` over their stacked parameters,
  which keeps one layer's working set live at a time."""

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"Qwen3Config.{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"Qwen3Config.num_heads ({self.num_heads}) must be a multiple of "
          f"num_kv_heads ({self.num_kv_heads})")
    if not isinstance(self.attention_block_size, int) or self.attention_block_size < 0:
      raise ValueError("Qwen3Config.attention_block_size must be a non-negative integer, "
                       f"got {self.attention_block_size!r}")
    if self.head_dim % 2:
      raise ValueError(f"Qwen3Config.head_dim must be even for RoPE, got {self.head_dim}")
    if not self.rope_theta > 0:
      raise ValueError(f"Qwen3Config.rope_theta must be positive, got {self.rope_theta}")

  def replace(self, **changes) -> "Qwen3Config":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides
              ) -> "Qwen3Config":
    """Reads a Hugging Face Qwen3 `config.json` (a directory, a file, or its dict).

    Both transformers v4 (`rope_theta` at the top level) and v5 (`rope_parameters`
    dict) spellings are accepted. Features Qwen3 checkpoints do not use (attention
    bias, sliding windows, RoPE scaling) are rejected rather than silently ignored.
    """
    source = "<dict>"
    if isinstance(path_or_dict, Mapping):
      hf = dict(path_or_dict)
    else:
      source = os.fspath(path_or_dict)
      if os.path.isdir(source):
        source = os.path.join(source, "config.json")
      try:
        with open(source) as f:
          hf = json.load(f)
      except FileNotFoundError:
        raise FileNotFoundError(f"{source}: no config.json there") from None
      except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    return cls(**_config_fields_from_hf(hf, source), **overrides)

  def to_hf(self) -> dict[str, Any]:
    """The `config.json` dict transformers (v4 and v5) reads back as this architecture."""
    dtype = jnp.dtype(self.param_dtype).name
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }

  def num_params(self, *, include_embedding: bool = True) -> int:
    """Parameter count (the LM head counted once when tied)."""
    h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
    attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * d
    layer = attn + 3 * h * i + 2 * h
    body = self.num_layers * layer + h
    embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
    return body + (embed if include_embedding else 0)


_HF_REQUIRED = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
}


def _config_fields_from_hf(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
  model_type = hf.get("model_type")
  if model_type != "qwen3":
    raise ValueError(
        f"{source}: field 'model_type' is {model_type!r}; only 'qwen3' checkpoints are "
        "supported")
  missing = [k for k in _HF_REQUIRED if k not in hf]
  if missing:
    raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
  fields = {ours: hf[theirs] for theirs, ours in _HF_REQUIRED.items()}
  fields["num_kv_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
  fields["head_dim"] = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: field 'hidden_act' is {hf['hidden_act']!r}; Qwen3 uses 'silu'")
  if hf.get("attention_bias"):
    raise ValueError(f"{source}: field 'attention_bias' is true; not supported for Qwen3")
  if hf.get("use_sliding_window"):
    raise ValueError(f"{source}: field 'use_sliding_window' is true; not supported")

  theta = None
  rope = hf.get("rope_parameters")
  if isinstance(rope, Mapping):  # transformers v5
    if rope.get("rope_type", "default") != "default":
      raise ValueError(
          f"{source}: field 'rope_parameters.rope_type' is {rope['rope_type']!r}; only "
          "'default' RoPE is supported")
    theta = rope.get("rope_theta")
  elif rope is not None:
    raise ValueError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
  scaling = hf.get("rope_scaling")
  if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
    raise ValueError(f"{source}: field 'rope_scaling' is {scaling!r}; RoPE scaling is not "
                     "supported")
  if theta is None:
    theta = hf.get("rope_theta", 10_000.0)  # transformers v4; its default when absent
  fields["rope_theta"] = float(theta)
  fields["rms_norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
  fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
  fields["max_position_embeddings"] = int(hf.get("max_position_embeddings", 40_960))
  return fields


# Published shapes (the checkpoints' config.json on the Hugging Face hub).
PRESETS: dict[str, Qwen3Config] = {
    "Qwen3-0.6B": Qwen3Config(
        vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-1.7B": Qwen3Config(
        vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-4B": Qwen3Config(
        vocab_size=151_936, hidden_size=2560, intermediate_size=9728, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen3-8B": Qwen3Config(
        vocab_size=151_936, hidden_size=4096, intermediate_size=12_288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
    "Qwen3-4B-Instruct-2507": Qwen3Config(
        vocab_size=151_936, hidden_size=2560, intermediate_size=9728, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
        rope_theta=5_000_000.0, max_position_embeddings=262_144),
}


# --------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
  """Preallocated keys and values of every layer, for incremental decoding.

  Slots fill left to right; `index` is the next free slot, shared by all rows (prompts
  are left-padded, so padding occupies masked slots) or kept per row.
  """

  k: tuple[jax.Array, ...]
  """Per layer, keys `[B, K, S, D]` (RoPE applied; heads-major so attention reads
  the cache without transposing it every step)."""
  v: tuple[jax.Array, ...]
  """Per layer, values `[B, K, S, D]`."""
  mask: jax.Array
  """`[B, S]` int32: 1 where a slot holds a real token."""
  index: jax.Array
  """int32: the next slot to write, a scalar shared by all rows, or `[B]`, one per row
  (rows that start and end independently: `oel_jax.slots`)."""

  @classmethod
  def zeros(cls, config: Qwen3Config, batch: int, slots: int, dtype=None) -> "KVCache":
    dtype = dtype or config.compute_dtype
    shape = (batch, config.num_kv_heads, slots, config.head_dim)
    k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return cls(k=k, v=v, mask=jnp.zeros((batch, slots), jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def slots(self) -> int:
    return self.mask.shape[1]


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, init, shape, dtype, spec: tuple) -> nnx.Param:
  # The spec is metadata only (eager_sharding off): placement happens where a mesh is
  # known (oel_jax.parallel, models.hf.load_hf), so a model can be built without one.
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=spec,
                   eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis, computed in float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), param_dtype, (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, half-split convention. x `[B, T, heads, D]`, positions `[B, T]`."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def write_slots(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """`cache` `[B, K, S, D]` with `new` `[B, K, T, D]` written at slots `index:index + T`
  (`index` a scalar, or `[B]`: each row's own).

  16-bit floats are written as their uint16 bits: XLA:CPU widens a bf16
  dynamic-update-slice to float32 over the whole cache (reading and writing every slot of
  every layer at each decode step), while an integer one updates in place.
  """
  new = new.astype(cache.dtype)
  if jnp.ndim(index) == 1:
    update = jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, 1))
  else:
    update = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, 2)
  if jnp.issubdtype(cache.dtype, jnp.floating) and cache.dtype.itemsize == 2:
    bits = update(jax.lax.bitcast_convert_type(cache, jnp.uint16),
                  jax.lax.bitcast_convert_type(new, jnp.uint16), index)
    return jax.lax.bitcast_convert_type(bits, cache.dtype)
  return update(cache, new, index)


def _einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """Matmul in `dtype` with float32 accumulation (fast bf16 path on CPU and TPU).

  The result is float32. For a 16-bit `dtype` the backward pass multiplies in `dtype` too
  (`_einsum_16bit`); JAX's own transpose would multiply the float32 cotangent by the other
  operand converted to float32, i.e. run every backward matmul in float32.
  """
  if jnp.dtype(dtype).itemsize == 2:
    _einsum_operand_specs(spec)  # a spec the backward cannot transpose fails while tracing
    return _einsum_16bit(spec, a.astype(dtype), b.astype(dtype))
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32)


def _einsum_operand_specs(spec: str) -> tuple[str, str, str]:
  """The two operands' and the output's index letters of a two-operand einsum `spec`.

  Each operand's gradient is itself an einsum of the cotangent and the other operand, which
  holds only when every index of an operand occurs in the other operand or the output, and
  no operand repeats an index (no traces, no sums over one operand alone).
  """
  inputs, arrow, out = spec.replace(" ", "").partition("->")
  operands = inputs.split(",")
  if not arrow or len(operands) != 2:
    raise ValueError(f"_einsum: spec {spec!r} must be explicit ('ab,bc->ac') with two "
                     "operands")
  sa, sb = operands
  for name, mine, others in (("first", sa, sb + out), ("second", sb, sa + out)):
    if len(set(mine)) != len(mine) or not set(mine) <= set(others):
      raise ValueError(f"_einsum: spec {spec!r}: the {name} operand's indices {mine!r} must "
                       "be distinct and each occur in the other operand or the output")
  return sa, sb, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_16bit(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`einsum(spec, a, b)` of two 16-bit operands, float32 result, whose backward matmuls
  take the cotangent rounded to the operands' dtype (float32 accumulation), as mixed
  precision does (PyTorch autocast's backward). Most cotangents come from a value that was
  cast to the compute dtype at once, so that rounding is exact for them."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_16bit_fwd(spec, a, b):
  return _einsum_16bit(spec, a, b), (a, b)


def _einsum_16bit_bwd(spec, residuals, g):
  a, b = residuals
  sa, sb, out = _einsum_operand_specs(spec)
  g = g.astype(a.dtype)  # [out]
  da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_einsum_16bit.defvjp(_einsum_16bit_fwd, _einsum_16bit_bwd)


class Attention(nnx.Module):
  """Grouped-query self-attention with q/k RMSNorm before RoPE."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
    self.config = config
    c, pd = config, config.param_dtype
    init = nnx.initializers.normal(0.02)
    self.q_proj = _param(rngs, init, (c.hidden_size, c.num_heads, c.head_dim), pd,
                         (FSDP, TP, None))
    self.k_proj = _param(rngs, init, (c.hidden_size, c.num_kv_heads, c.head_dim), pd,
                         (FSDP, TP, None))
    self.v_proj = _param(rngs, init, (c.hidden_size, c.num_kv_heads, c.head_dim), pd,
                         (FSDP, TP, None))
    self.o_proj = _param(rngs, init, (c.num_heads, c.head_dim, c.hidden_size), pd,
                         (TP, None, FSDP))
    self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, param_dtype=pd, rngs=rngs)
    self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, param_dtype=pd, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, attend: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x `[B, T, H]`; attend `[B, T, S]` bool (S = T without a cache), or, without a
    cache, the `[B, T]` key mask alone for causal blockwise attention.

    With a cache, `kv` holds this layer's `[B, K, S, D]` keys and values; the new ones
    are written at slot `index` and the updated pair is returned.
    """
    q, k, v = self.project(x, positions)
    if kv is not None:
      cache_k, cache_v = kv
      k, v = write_slots(cache_k, k, index), write_slots(cache_v, v, index)
      kv = (k, v)
    return self.attend(q, k, v, attend), kv

  def project(self, x: jax.Array, positions: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries `[B, T, K, G, D]`, keys and values `[B, K, T, D]` of x `[B, T, H]` at
    `positions` `[B, T]` (q/k norms and RoPE applied; compute dtype)."""
    c, dt = self.config, self.config.compute_dtype
    q = _einsum("bth,hnd->btnd", x, self.q_proj[...], dt)
    k = _einsum("bth,hkd->btkd", x, self.k_proj[...], dt)
    v = _einsum("bth,hkd->bktd", x, self.v_proj[...], dt).astype(dt)
    q = rope(self.q_norm(q), positions, c.rope_theta).astype(dt)
    k = rope(self.k_norm(k), positions, c.rope_theta).astype(dt).transpose(0, 2, 1, 3)
    b, t = q.shape[:2]
    return q.reshape(b, t, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim), k, v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, attend: jax.Array) -> jax.Array:
    """The output projection `[B, T, H]` of q `[B, T, K, G, D]` attending to k, v
    `[B, K, S, D]`: where `attend` `[B, T, S]` is set, or, given the `[B, T]` key mask
    alone (S = T), causally and blockwise."""
    c, dt = self.config, self.config.compute_dtype
    b, t = q.shape[:2]
    if attend.ndim == 2:
      block = c.attention_block_size
      # Fewer queries than a block (after a cached prefix: S > T): one block of them, not a
      # block padded up.
      out = attention.blockwise_causal_attention(q, k, v, attend, block_q=min(block, t),
                                                 block_k=block)
    else:
      scores = _einsum("btkgd,bksd->bkgts", q, k, dt) * (c.head_dim ** -0.5)
      scores = jnp.where(attend[:, None, None, :, :], scores, _MASK_VALUE)
      probs = jax.nn.softmax(scores, axis=-1)
      # Batch-major output, then transpose: XLA:CPU's DotThunk rejects bf16 x bf16 -> f32
      # when the dot itself must emit [B, T, K, G, D].
      out = _einsum("bkgts,bksd->bkgtd", probs, v, dt).astype(dt)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.num_heads, c.head_dim)
    return _einsum("btnd,ndh->bth", out, self.o_proj[...], dt).astype(dt)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
    self.config = config
    c, pd = config, config.param_dtype
    init = nnx.initializers.normal(0.02)
    self.gate_proj = _param(rngs, init, (c.hidden_size, c.intermediate_size), pd, (FSDP, TP))
    self.up_proj = _param(rngs, init, (c.hidden_size, c.intermediate_size), pd, (FSDP, TP))
    self.down_proj = _param(rngs, init, (c.intermediate_size, c.hidden_size), pd, (TP, FSDP))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.config.compute_dtype
    gate = _einsum("bth,hi->bti", x, self.gate_proj[...], dt)
    up = _einsum("bth,hi->bti", x, self.up_proj[...], dt)
    h = (jax.nn.silu(gate) * up).astype(dt)
    return _einsum("bti,ih->bth", h, self.down_proj[...], dt).astype(dt)


class DecoderLayer(nnx.Module):
  """Pre-norm attention block followed by a pre-norm MLP block."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
    pd, eps = config.param_dtype, config.rms_norm_eps
    self.input_norm = RMSNorm(config.hidden_size, eps=eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.post_attn_norm = RMSNorm(config.hidden_size, eps=eps, param_dtype=pd, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, attend, kv=None, index=None):
    h, kv = self.attn(self.input_norm(x), positions, attend, kv, index)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x))
    return x, kv


def _mesh_has(*axes: str) -> bool:
  """Whether a mesh with all of `axes` is active (sharding constraints apply only then)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and set(axes) <= set(mesh.axis_names)


def embed_tokens(embedding: jax.Array, input_ids: jax.Array) -> jax.Array:
  """Rows of `embedding` `[V, H]` at `input_ids` `[B, T]` -> `[B, T, H]`, batch-sharded.

  Under a mesh the table is first gathered over fsdp (kept split over tp along V): a lookup
  into a table split along H by fsdp gives rows split along H, which XLA cannot turn into
  rows split along the batch (fsdp again) without replicating them whole, in the forward
  pass and in the gradient's scatter. Split along V only, the lookup is the usual
  vocabulary-parallel one (each tp shard looks up its rows, a sum over tp joins them).
  """
  if _mesh_has(TP):
    embedding = jax.lax.with_sharding_constraint(embedding, P(TP, None))
  if jnp.issubdtype(embedding.dtype, jnp.floating) and embedding.dtype.itemsize == 2:
    rows = _take_rows_by_bits(embedding, input_ids)
  else:
    rows = jnp.take(embedding, input_ids, axis=0)
  return constrain_batch(rows)


@jax.custom_vjp
def _take_rows_by_bits(table: jax.Array, ids: jax.Array) -> jax.Array:
  """`jnp.take(table, ids, axis=0)` for a 16-bit float `table` `[V, H]`, gathered as its
  uint16 bits: the same values (NaN rows for ids out of range) and the same gradient.

  Why: XLA:CPU gathers 16-bit floats in float32, converting the table's elements first.
  Inside a decode loop that conversion of the loop-invariant table is hoisted out of the
  loop and runs over the whole table once per call (622 MB written for Qwen3-0.6B's table,
  2.5 GB for Qwen3-8B's), to gather a few rows per step; so would a bitcast to uint16 be
  (a copy). The barrier ties the table to the ids, which change every step, so neither can
  be hoisted: the bitcast fuses into the gather, which then reads only the rows it takes.
  The bit gather has no derivative of its own, hence the custom VJP: the plain gather's.
  """
  table, ids = jax.lax.optimization_barrier((table, ids))
  nan_bits = int(np.asarray(np.nan, table.dtype).view(np.uint16))
  bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0,
                  fill_value=nan_bits)
  return jax.lax.bitcast_convert_type(bits, table.dtype)


def _take_rows_by_bits_fwd(table, ids):
  return _take_rows_by_bits(table, ids), (table, ids)


def _take_rows_by_bits_bwd(residuals, cotangent):
  table, ids = residuals
  _, pullback = jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)
  return pullback(cotangent)[0], None


_take_rows_by_bits.defvjp(_take_rows_by_bits_fwd, _take_rows_by_bits_bwd)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins dimension 0 to the mesh's batch axes (data, fsdp) when a mesh is active.

  Parameters shard along fsdp too, so without this XLA may choose to split activations
  along the hidden dimension and keep every row on every device.
  """
  if not _mesh_has(DATA, FSDP):
    return x
  return jax.lax.with_sharding_constraint(x, P((DATA, FSDP)))


def _stacked_layer_params(layers, compute_dtype):
  """Every layer's parameters stacked along a new leading axis (the scan's `xs`).

  Matmul weights are cast to the compute dtype first (the einsums cast them anyway, so
  values and gradients are unchanged) to halve the stacked copy; norm scales keep their
  dtype. Under a mesh each stacked array keeps its parameter's sharding, unsplit along
  the layer axis, so that each scan step gathers only its own layer's shards.
  """
  states = [nnx.state(layer) for layer in layers]
  mesh = jax.sharding.get_abstract_mesh()
  shard = not mesh.empty and {FSDP, TP} <= set(mesh.axis_names)
  variables = jax.tree.leaves(states[0], is_leaf=lambda x: isinstance(x, nnx.Variable))
  columns = zip(*(jax.tree.leaves(state) for state in states))
  stacked = []
  for variable, values in zip(variables, columns):
    out = jnp.stack([v.astype(compute_dtype) if v.ndim >= 2 else v for v in values])
    if shard:
      spec = variable.get_metadata().get("out_sharding") or ()
      out = jax.lax.with_sharding_constraint(out, P(None, *spec))
    stacked.append(out)
  return jax.tree.unflatten(jax.tree.structure(states[0]), stacked)


def _scan_layers(layers, x, positions, attend):
  """All decoder layers as one `lax.scan` over stacked parameters, each rematerialised.

  Why a scan rather than `jax.checkpoint` on each layer of a Python loop: XLA:CPU drops
  the optimisation barriers that keep rematerialisation in place and schedules every
  layer's recomputation next to its forward pass, and its collective combiners merge all
  layers' weight all-gathers and gradient reductions into single ops, so per-layer working
  sets (attention scores, gathered weights, unreduced gradients) stayed live for all
  layers at once (3.5 GiB per layer per row for Qwen3-8B on 8 devices). A loop body is
  one layer: its recomputation, gathers and reductions cannot move across iterations on
  any backend. (Pure functions rather than `nnx.scan`/`nnx.remat`: the model is often
  merged from parameters inside other transforms, where NNX refuses to touch a module
  from a different trace level.)
  """
  graphdef = nnx.graphdef(layers[0])
  stacked = _stacked_layer_params(layers, x.dtype)

  def body(x, state):
    x = nnx.merge(graphdef, state)(x, positions, attend)[0]
    return constrain_batch(x), None

  x, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), x, stacked)
  return x


def positions_from_mask(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """Position ids `[B, T]` counting real tokens only: left/right padding both work."""
  pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
  return jnp.maximum(pos, 0) + jnp.asarray(offset, jnp.int32)


class Qwen3(nnx.Module):
  """Qwen3 causal language model.

  `model(input_ids, positions=None, attention_mask=None)` returns float32 logits
  `[B, T, V]`. With `cache=` it runs incrementally and returns `(logits, new_cache)`.
  """

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
    self.config = config
    pd = config.param_dtype
    self.embed = _param(rngs, nnx.initializers.normal(0.02),
                        (config.vocab_size, config.hidden_size), pd, (TP, FSDP))
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pd,
                              rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, nnx.initializers.normal(0.02),
                            (config.vocab_size, config.hidden_size), pd, (TP, FSDP))

  def unembedding(self) -> jax.Array:
    """The LM head matrix `[V, H]` (the embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed[...]
    return self.lm_head[...]

  def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                    attention_mask: jax.Array | None = None, *, cache: KVCache | None = None
                    ) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states `[B, T, H]` (compute dtype) and the updated cache."""
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    elif attention_mask.shape != (b, t):
      raise ValueError(
          f"attention_mask shape {attention_mask.shape} does not match input_ids {(b, t)}")
    attention_mask = attention_mask.astype(jnp.int32)
    c = self.config

    if cache is None:
      if positions is None:
        positions = positions_from_mask(attention_mask)
      if 0 < c.attention_block_size < t:  # blockwise: causal from indices, keys masked
        attend = attention_mask
      else:
        causal = jnp.tril(jnp.ones((t, t), bool))
        attend = causal[None] & (attention_mask[:, None, :] > 0)
    else:
      if positions is None:
        positions = positions_from_mask(attention_mask, cache.mask.sum(-1, keepdims=True))
      if cache.index.ndim == 1:  # each row at its own slot
        slot_mask = jax.vmap(lambda m, a, i: jax.lax.dynamic_update_slice_in_dim(m, a, i, 0))(
            cache.mask, attention_mask, cache.index)
        query_slot = cache.index[:, None] + jnp.arange(t)  # [B, T]
        causal = jnp.arange(cache.slots) <= query_slot[:, :, None]  # [B, T, S]
      else:
        slot_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask,
                                                        cache.index, 1)
        query_slot = cache.index + jnp.arange(t)
        causal = (jnp.arange(cache.slots)[None, :] <= query_slot[:, None])[None]  # [1, T, S]
      attend = causal & (slot_mask[:, None, :] > 0)

    x = embed_tokens(self.embed[...], input_ids).astype(c.compute_dtype)
    new_k, new_v = [], []
    if c.remat and cache is None:
      x = _scan_layers(self.layers, x, positions, attend)
    else:
      for i, layer in enumerate(self.layers):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, kv = layer(x, positions, attend, kv, None if cache is None else cache.index)
        x = constrain_batch(x)
        if kv is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
    x = self.final_norm(x)
    if cache is not None:
      cache = KVCache(k=tuple(new_k), v=tuple(new_v), mask=slot_mask, index=cache.index + t)
    return x, cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits `[B, T, V]` from final hidden states `[B, T, H]`."""
    return _einsum("bth,vh->btv", hidden, self.unembedding(), self.config.compute_dtype)

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None, *, cache: KVCache | None = None):
    hidden, new_cache = self.hidden_states(input_ids, positions, attention_mask, cache=cache)
    logits = self.logits(hidden)
    return logits if cache is None else (logits, new_cache)


def init_model(config: Qwen3Config, seed: int = 0) -> Qwen3:
  """A randomly initialised model (normal(0.02) weights, unit norm scales)."""
  return Qwen3(config, rngs=nnx.Rngs(params=seed))


def abstract_model(config: Qwen3Config) -> Qwen3:
  """The model's structure with `jax.ShapeDtypeStruct` leaves: no memory is allocated."""
  return nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(params=0)))
