"""The memory-bounded divergence over token chunks, with its custom VJP.

`_chunked_per_token` takes the flattened hidden states in chunks and both unembeddings and
never holds `[N, V]` logits, forward or backward; `oel_jax.losses.hidden` wraps it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from oel_jax.losses.core import (_divergence_on_support, _entropy, _gather, _outside_support,
                                 _support, _support_masses, _support_size)


@dataclasses.dataclass(frozen=True)
class _ChunkConfig:
  divergence: str
  k: int
  renormalize: bool
  tail: bool
  with_entropy: bool
  vocab_chunk_size: int


def _chunk_logits(hidden, unembed):
  """`[C, H] x [V, H] -> [C, V]` float32 logits (float32 accumulation)."""
  return jnp.einsum("ch,vh->cv", hidden, unembed, preferred_element_type=jnp.float32)


# How the backward pass works. With s = z / T the scaled student logits, ls = s - lse(s),
# S the support (fixed, chosen without gradient) and G = dD/d(ls|S) (the gradient of the
# per-token divergence with respect to the student's log-probs on S, renormalisation
# included), the chain rule through the log-softmax gives, for every vocabulary entry j:
#
#     dD/dz_j = (G_j [j in S] - q_j * sum(G)) / T,        q = softmax(s).
#
# The forward pass keeps, per token, lse(s), sum(G) and (for a top-k support) S and G: a few
# `[N, K]` arrays. The backward pass then walks the vocabulary in tiles of
# `vocab_chunk_size` (outer loop) and the tokens in chunks (inner loop), recomputing one
# `[chunk, vocab_tile]` logits block at a time: it never needs a `[N, V]` or a float32
# `[V, H]` buffer, and each tile of the unembedding's gradient is accumulated in float32
# over all tokens and written once. For the full vocabulary (k = 0 or k >= V) G is dense,
# G_j = dD/dls_j of the element-wise terms, so the teacher's logits tile is recomputed too
# (renormalising over the full vocabulary changes nothing, so it is ignored there).
#
# The tail bucket (`tail=True`) fits the same scheme: p_tail = 1 - sum_{i in S} exp(ls_i)
# depends on the student's log-probs only through S, so its term p_tail (log p_tail -
# log q_tail) is a function of ls|S (and constants of the teacher) and simply adds
# -p_i (log p_tail - log q_tail + 1) to G on S (`_tail_term`). Only the tail log-masses'
# values need the full vocabulary; the forward pass takes them as log-sum-exps over the
# complement of S from the logits it already holds. (For the forward KL the tail's G on S
# would be q_tail p_i / p_tail, huge when the student's tail is tiny, and cancelling against
# the dense term in float32; tail=True is refused there.)


def _scaled_logsumexp(z, temperature):
  """logsumexp(z / temperature) over the last axis, as two fusible reductions over z."""
  m = jnp.max(z, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return m / temperature + jnp.log(
      jnp.sum(jnp.exp((z - m[..., None]) / temperature), axis=-1))


def _chunked_forward(cfg, hs, ws, ht, wt, temperature):
  """Forward over token chunks: hs `[n, C, H]`, ht `[n, C, H']`.

  Returns ((divergence, student_entropy, teacher_entropy, student_support_mass,
  teacher_support_mass), saved): outputs `[n, C]`; saved is a dict of per-token residuals
  for the backward pass.
  """
  sparse = _support_size(cfg.divergence, cfg.k, ws.shape[0]) is not None

  def body(xs):
    hs_c, ht_c = xs
    # Select the top-k on the raw logits (same order as the log-probs, T > 0) and gather
    # from them, so that XLA can fuse the scaling and log-softmax into reductions instead
    # of holding more [C, V] float32 arrays.
    zs = _chunk_logits(hs_c, ws)
    zt = _chunk_logits(ht_c, wt)
    lse_s = _scaled_logsumexp(zs, temperature)
    lse_t = _scaled_logsumexp(zt, temperature)
    idx, valid = _support(cfg.divergence, cfg.k, zs, zt)
    ls_s = _gather(zs, idx) / temperature - lse_s[:, None]
    lt_s = _gather(zt, idx) / temperature - lse_t[:, None]
    renorm = cfg.renormalize and sparse  # a no-op over the full vocabulary
    tails = None
    if cfg.tail and sparse:  # the full vocabulary has an empty tail
      outside = _outside_support(idx, zs.shape)
      tails = tuple(_scaled_logsumexp(jnp.where(outside, z, -jnp.inf), temperature) - lse
                    for z, lse in ((zs, lse_s), (zt, lse_t)))
    div_of = lambda a: _divergence_on_support(cfg.divergence, renorm, a, lt_s, valid, tails)
    div, vjp = jax.vjp(div_of, ls_s)
    (g,) = vjp(jnp.ones_like(div))
    saved = {"lse_s": lse_s, "sum_g": jnp.sum(g, axis=-1)}
    if sparse:
      saved.update(idx=idx, g=g)
    else:
      saved.update(lse_t=lse_t)
    if cfg.with_entropy:
      ent_s = _entropy(zs / temperature - lse_s[:, None])
      ent_t = _entropy(zt / temperature - lse_t[:, None])
    else:
      ent_s = ent_t = jnp.zeros_like(div)
    mass_s, mass_t = _support_masses(ls_s, lt_s, valid)
    return (div, ent_s, ent_t, mass_s, mass_t), saved

  return jax.lax.map(body, (hs, ht))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_per_token(cfg, hs, ws, ht, wt, temperature):
  return _chunked_forward(cfg, hs, ws, ht, wt, temperature)[0]


def _chunked_per_token_fwd(cfg, hs, ws, ht, wt, temperature):
  out, saved = _chunked_forward(cfg, hs, ws, ht, wt, temperature)
  return out, (hs, ws, ht, wt, temperature, saved)


def _chunked_per_token_bwd(cfg, res, cotangents):
  # Only the divergence is differentiated; the public wrapper stop-gradients the statistics.
  hs, ws, ht, wt, temperature, saved = res
  g_tok = cotangents[0].astype(jnp.float32)  # [n, C]
  sparse = "idx" in saved
  vocab = ws.shape[0]
  tile = min(cfg.vocab_chunk_size, vocab)
  n_chunks = hs.shape[0]
  n_tiles = -(-vocab // tile)
  mm_dtype = jnp.result_type(hs.dtype, ws.dtype)
  dense_coef = g_tok * saved["sum_g"]  # [n, C]: multiplies q
  if sparse:
    chunk_xs = (hs, saved["lse_s"], dense_coef, saved["idx"], g_tok[..., None] * saved["g"])
  else:
    chunk_xs = (hs, saved["lse_s"], dense_coef, ht, saved["lse_t"], g_tok)
  # The unembedding tile's gradient is dz^T hs, a dot contracting both operands' leading
  # (token) dimension. XLA:CPU multiplies 16-bit operands natively only when the left
  # operand is contracted on its last dimension; otherwise it converts both to float32 and
  # runs a float32 matmul (several times slower with AMX). An explicit transpose of dz is
  # folded back into the dot, and transposing a `[H, tile]` accumulator instead costs a
  # strided pass slower than the float32 dot. So in 16-bit on XLA:CPU, for a top-k
  # support, the tile's logits are also computed transposed, `[tile, C]` (a matmul in the
  # fast form, both operands contracted on their last dimension), and dz^T is built from
  # them directly: every dot then runs in bf16, at the price of one more logits matmul per
  # chunk. Float32, the full vocabulary and other backends (XLA:TPU multiplies the direct
  # form in bf16) keep the direct form.
  transposed = sparse and _grad_tile_transposed(mm_dtype)

  # Tiles run last to first. The last tile is shifted back to end at V; its rows that the
  # tile before it also covers are zeroed (so the hidden-state gradient counts them once)
  # and then overwritten with their true values when that tile is written.
  ws_v, to_ws = _sliceable(ws)
  wt_v, to_wt = _sliceable(wt)
  dw_v, to_dw = _sliceable(jnp.zeros(ws.shape, ws.dtype))

  def tile_body(carry, j):
    dw_v, dh = carry
    start = jnp.minimum(j * tile, vocab - tile)
    fresh = (start + jnp.arange(tile)) >= j * tile  # [tile]
    ws_j = to_ws(jax.lax.dynamic_slice_in_dim(ws_v, start, tile, axis=0))
    wt_j = None if sparse else to_wt(jax.lax.dynamic_slice_in_dim(wt_v, start, tile, axis=0))

    def chunk_grads(xs):
      """One token chunk's `([tile, H] unembedding, [C, H] hidden)` gradients."""
      hs_c = xs[0]
      dz = _tile_logits_grad(cfg, xs, ws_j, wt_j, start, temperature)
      dz = jnp.where(fresh[None, :], dz, 0.0).astype(mm_dtype)
      if transposed:
        dz_t = _tile_logits_grad_transposed(xs, ws_j, start, temperature)  # [tile, C]
        dz_t = jnp.where(fresh[:, None], dz_t, 0.0).astype(mm_dtype)
        dw_c = jnp.einsum("vc,ch->vh", dz_t, hs_c, preferred_element_type=jnp.float32)
      else:
        dw_c = jnp.einsum("cv,ch->vh", dz, hs_c, preferred_element_type=jnp.float32)
      return dw_c, jnp.einsum("cv,vh->ch", dz, ws_j, preferred_element_type=jnp.float32)

    def chunk_body(acc, xs):
      dw_c, dh_c = chunk_grads(xs)
      return acc + dw_c, dh_c

    # The first chunk's product starts the tile's float32 accumulator (the same sums as
    # adding it to zeros, without a zero fill and an add of the whole tile per tile).
    xs = chunk_xs
    acc, dh_first = chunk_grads(jax.tree.map(lambda x: x[0], xs))
    if n_chunks > 1:
      acc, dh_rest = jax.lax.scan(chunk_body, acc, jax.tree.map(lambda x: x[1:], xs))
      dh_j = jnp.concatenate([dh_first[None], dh_rest])
    else:
      dh_j = dh_first[None]
    new = _sliceable(acc.astype(ws.dtype))[0]
    dw_v = jax.lax.dynamic_update_slice_in_dim(dw_v, new, start, axis=0)
    return (dw_v, dh + dh_j), None

  init = (dw_v, jnp.zeros(hs.shape, jnp.float32))
  (dw_v, dh), _ = jax.lax.scan(tile_body, init, jnp.arange(n_tiles), reverse=True)
  return (dh.astype(hs.dtype), to_dw(dw_v), jnp.zeros_like(ht), jnp.zeros_like(wt),
          jnp.zeros_like(temperature))


def _grad_tile_transposed(mm_dtype) -> bool:
  """Whether the backward pass (for a top-k support) multiplies the unembedding tile's
  gradient from dz^T built from transposed logits (16-bit matmuls; see
  `_chunked_per_token_bwd`) rather than from dz.

  Only for XLA:CPU: XLA:TPU multiplies the direct form's 16-bit operands as given
  (`bench/tpu_compile.py step`), so there the extra logits matmul would be pure cost."""
  return jnp.dtype(mm_dtype).itemsize == 2 and _traced_platform() == "cpu"


def _traced_platform() -> str:
  """The platform of the program being traced: its mesh's devices (a `Trainer` on a mesh
  traces under `jax.set_mesh`), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _tile_logits_grad_transposed(xs, ws_j, start, temperature):
  """`_tile_logits_grad`'s `[tile, C]` transpose for a top-k support, computed from the
  transposed logits `[tile, C]` (no transpose of a `[C, tile]` array)."""
  hs_c, lse_c, coef_c, idx_c, u_c = xs
  tile = ws_j.shape[0]
  s = jnp.einsum("vh,ch->vc", ws_j, hs_c, preferred_element_type=jnp.float32) / temperature
  q = jnp.exp(s - lse_c[None, :])
  local = idx_c - start
  local = jnp.where((local >= 0) & (local < tile), local, tile)  # tile = dropped
  cols = jnp.broadcast_to(jnp.arange(hs_c.shape[0])[:, None], local.shape)
  point = jnp.zeros(s.shape, jnp.float32).at[local, cols].add(u_c, mode="drop")
  return (point - q * coef_c[None, :]) / temperature


def _tile_logits_grad(cfg, xs, ws_j, wt_j, start, temperature):
  """dD/dz `[C, tile]` float32 for one token chunk on the vocabulary tile from `start`.

  `xs` is the chunk's slice of the backward pass's inputs: `(hs, lse_s, dense_coef, idx,
  g_tok * G)` for a top-k support, with `wt_j` None; `(hs, lse_s, dense_coef, ht, lse_t,
  g_tok)` for the full vocabulary, with `wt_j` the teacher's unembedding tile.
  """
  sparse = wt_j is None
  tile = ws_j.shape[0]
  if sparse:
    hs_c, lse_c, coef_c, idx_c, u_c = xs
  else:
    hs_c, lse_c, coef_c, ht_c, lse_t_c, g_c = xs
  s = _chunk_logits(hs_c, ws_j) / temperature  # [C, tile]
  q = jnp.exp(s - lse_c[:, None])
  if sparse:
    local = idx_c - start
    local = jnp.where((local >= 0) & (local < tile), local, tile)  # tile = dropped
    rows = jnp.broadcast_to(jnp.arange(hs_c.shape[0])[:, None], local.shape)
    point = jnp.zeros(s.shape, jnp.float32).at[rows, local].add(u_c, mode="drop")
  else:
    ls = s - lse_c[:, None]
    lt = _chunk_logits(ht_c, wt_j) / temperature - lse_t_c[:, None]
    _, vjp = jax.vjp(lambda a: _divergence_on_support(cfg.divergence, False, a, lt, None), ls)
    (point,) = vjp(g_c)
  return (point - q * coef_c[:, None]) / temperature


def _sliceable(x):
  """A view of `x` that XLA:CPU slices and updates in place, and the way back.

  XLA:CPU has no native 16-bit float slicing: it converts the whole operand of a
  dynamic-slice / dynamic-update-slice to float32, and inside a loop hoists that conversion,
  holding a float32 copy of the `[V, H]` unembedding. Slicing a same-width unsigned-integer
  view instead avoids it. Other backends and dtypes use `x` itself.
  """
  if jax.default_backend() == "cpu" and x.dtype in (jnp.bfloat16, jnp.float16):
    dtype = x.dtype
    return (jax.lax.bitcast_convert_type(x, jnp.uint16),
            lambda v: jax.lax.bitcast_convert_type(v, dtype))
  return x, lambda v: v


_chunked_per_token.defvjp(_chunked_per_token_fwd, _chunked_per_token_bwd)
