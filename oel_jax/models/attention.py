"""Blockwise causal attention (online softmax) with a recomputing backward pass.

The plain attention in `oel_jax.models.qwen3` materialises float32 scores `[B, N, T, T]`:
13 GiB per row for the teacher's 10,240-token input at Qwen3-8B's 32 heads, several
times over once softmax and its gradient are counted. This form never holds more than
one `[B, N, block_q, block_k]` tile: queries are taken in blocks, and for each query block
the key blocks are folded in with a running maximum and normaliser (FlashAttention's
online softmax). Key blocks wholly above the causal diagonal are skipped. The backward
pass is a custom VJP that keeps only the output and the per-query log-sum-exp, and
recomputes each tile's probabilities from them (FlashAttention-2's backward).

Masking is the plain path's: query t attends key s when s <= t and `key_mask[b, s]` is
set; masked scores get the same finite mask value, so a query with no visible key
(padding) averages over the keys it was offered rather than producing NaN. Only such
fully masked (padding) queries may differ from the plain path, since skipped blocks are
not offered to them; every real query's output and every gradient that reaches real
tokens is the plain path's up to float rounding.

Shapes: B batch, T query/key length, K key/value heads, G query heads per key/value head,
D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _einsum(spec, a, b, dtype):
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32)


def _pad_to(x, axis, multiple):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


class _Blocks:
  """Static blocking of one call: sizes, counts and the causal range of each block.

  T queries against S >= T keys: query t sits at key index t + S - T (the last T keys are
  the queries' own; the first S - T are a prefix every query sees, e.g. cached ones).
  """

  def __init__(self, t, s, block_q, block_k):
    self.t, self.s, self.bq, self.bk = t, s, block_q, block_k
    self.offset = s - t
    self.nq, self.nk = -(-t // block_q), -(-s // block_k)

  def last_key_block(self, i):
    """One past the last key block that query block i can see (causal)."""
    last_query = self.offset + jnp.minimum((i + 1) * self.bq, self.t) - 1
    return last_query // self.bk + 1

  def first_query_block(self, j):
    """The first query block that can see key block j (causal)."""
    return jnp.maximum(j * self.bk - self.offset, 0) // self.bq


def _tile_scores(q_i, k_j, key_mask, i, j, blocks, scale):
  """Masked float32 scores `[B, K, G, bq, bk]` of query block i against key block j."""
  s = _einsum("btkgd,bksd->bkgts", q_i, k_j, q_i.dtype) * scale
  q_pos = blocks.offset + i * blocks.bq + jnp.arange(blocks.bq)
  k_pos = j * blocks.bk + jnp.arange(blocks.bk)
  keep = jax.lax.dynamic_slice_in_dim(key_mask, j * blocks.bk, blocks.bk, 1) > 0  # [B, bk]
  visible = (k_pos[None, :] <= q_pos[:, None])[None] & keep[:, None, :]  # [B, bq, bk]
  s = jnp.where(visible[:, None, None], s, _MASK_VALUE)
  # Keys past the end (block padding) are never offered, even to fully masked queries.
  return jnp.where((k_pos < blocks.s)[None, None, None, None], s, -jnp.inf)


def _forward(q, k, v, key_mask, block_q, block_k):
  """Output `[B, K, G, T, D]` (q's dtype) and log-sum-exp `[B, K, G, T]` (float32)."""
  b, t, kh, g, d = q.shape
  dt, scale = q.dtype, d ** -0.5
  blocks = _Blocks(t, k.shape[2], block_q, block_k)
  qp, kp, vp = _pad_to(q, 1, block_q), _pad_to(k, 2, block_k), _pad_to(v, 2, block_k)
  mp = _pad_to(key_mask.astype(jnp.int32), 1, block_k)

  def query_block(_, i):
    q_i = jax.lax.dynamic_slice_in_dim(qp, i * block_q, block_q, 1)

    def key_block(j, carry):
      m, l, acc = carry
      k_j = jax.lax.dynamic_slice_in_dim(kp, j * block_k, block_k, 2)
      v_j = jax.lax.dynamic_slice_in_dim(vp, j * block_k, block_k, 2)
      s = _tile_scores(q_i, k_j, mp, i, j, blocks, scale)
      m_new = jnp.maximum(m, s.max(-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[..., None])
      l = alpha * l + p.sum(-1)
      acc = alpha[..., None] * acc + _einsum("bkgts,bksd->bkgtd", p, v_j, dt)
      return m_new, l, acc

    init = (jnp.full((b, kh, g, block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, block_q), jnp.float32),
            jnp.zeros((b, kh, g, block_q, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, blocks.last_key_block(i), key_block, init)
    return None, ((acc / l[..., None]).astype(dt), m + jnp.log(l))

  _, (out, lse) = jax.lax.scan(query_block, None, jnp.arange(blocks.nq))
  # [nq, B, K, G, bq, ...] -> [B, K, G, T, ...]
  out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, blocks.nq * block_q, d)[..., :t, :]
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, blocks.nq * block_q)[..., :t]
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, key_mask, block_q, block_k):
  return _forward(q, k, v, key_mask, block_q, block_k)[0]


def _attention_fwd(q, k, v, key_mask, block_q, block_k):
  out, lse = _forward(q, k, v, key_mask, block_q, block_k)
  return out, (q, k, v, key_mask, out, lse)


def _attention_bwd(block_q, block_k, res, d_out):
  q, k, v, key_mask, out, lse = res
  b, t, kh, g, d = q.shape
  dt, scale = q.dtype, d ** -0.5
  blocks = _Blocks(t, k.shape[2], block_q, block_k)
  # delta_t = sum_d dO * O: the softmax Jacobian's diagonal correction, per query.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, K, G, T]
  qp, kp, vp = _pad_to(q, 1, block_q), _pad_to(k, 2, block_k), _pad_to(v, 2, block_k)
  mp = _pad_to(key_mask.astype(jnp.int32), 1, block_k)
  dop = _pad_to(d_out, 3, block_q)
  lsep, deltap = _pad_to(lse, 3, block_q), _pad_to(delta, 3, block_q)

  def key_block(dq, j):
    k_j = jax.lax.dynamic_slice_in_dim(kp, j * block_k, block_k, 2)
    v_j = jax.lax.dynamic_slice_in_dim(vp, j * block_k, block_k, 2)

    def query_block(i, carry):
      dq, dk_j, dv_j = carry
      q_i = jax.lax.dynamic_slice_in_dim(qp, i * block_q, block_q, 1)
      do_i = jax.lax.dynamic_slice_in_dim(dop, i * block_q, block_q, 3)
      lse_i = jax.lax.dynamic_slice_in_dim(lsep, i * block_q, block_q, 3)
      delta_i = jax.lax.dynamic_slice_in_dim(deltap, i * block_q, block_q, 3)
      s = _tile_scores(q_i, k_j, mp, i, j, blocks, scale)
      p = jnp.exp(s - lse_i[..., None])  # [B, K, G, bq, bk]
      dv_j = dv_j + _einsum("bkgts,bkgtd->bksd", p, do_i, dt)
      dp = _einsum("bkgtd,bksd->bkgts", do_i, v_j, dt)
      ds = p * (dp - delta_i[..., None]) * scale
      dq_i = _einsum("bkgts,bksd->btkgd", ds, k_j, dt)
      dq = jax.lax.dynamic_update_slice_in_dim(
          dq, jax.lax.dynamic_slice_in_dim(dq, i * block_q, block_q, 1) + dq_i, i * block_q, 1)
      dk_j = dk_j + _einsum("bkgts,btkgd->bksd", ds, q_i, dt)
      return dq, dk_j, dv_j

    zeros = jnp.zeros((b, kh, block_k, d), jnp.float32)
    dq, dk_j, dv_j = jax.lax.fori_loop(blocks.first_query_block(j), blocks.nq, query_block,
                                       (dq, zeros, zeros))
    return dq, (dk_j, dv_j)

  dq0 = jnp.zeros(qp.shape, jnp.float32)
  dq, (dk, dv) = jax.lax.scan(key_block, dq0, jnp.arange(blocks.nk))
  # [nk, B, K, bk, D] -> [B, K, S, D]
  unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, kh, blocks.nk * block_k, d)[:, :, :blocks.s]
  return (dq[:, :t].astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype),
          None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                               key_mask: jax.Array, *, block_q: int = 512,
                               block_k: int = 512) -> jax.Array:
  """Causal grouped-query attention without materialising the score matrix.

  Args:
    q: `[B, T, K, G, D]` queries (RoPE applied), in the compute dtype.
    k: `[B, K, S, D]` keys (RoPE applied), same dtype; S >= T. The last T are the queries'
      own (query t sees keys up to S - T + t); the first S - T, a prefix every query may see
      (S = T: plain causal self-attention).
    v: `[B, K, S, D]` values, same dtype.
    key_mask: `[B, S]`, nonzero for real tokens (keys that may be attended).
    block_q: query rows per block.
    block_k: key columns per block.

  Returns:
    `[B, K, G, T, D]` attention output in q's dtype: softmax(q k^T / sqrt(D)) v over the
    visible keys, float32 scores and accumulation.
  """
  if q.ndim != 5 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"expected q [B, T, K, G, D], k and v [B, K, T, D]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  b, t, kh, _, d = q.shape
  s = k.shape[2] if k.ndim == 4 else t
  if k.shape != (b, kh, s, d) or key_mask.shape != (b, s) or s < t:
    raise ValueError(f"q {q.shape}, k {k.shape} and key_mask {key_mask.shape} disagree")
  if block_q <= 0 or block_k <= 0:
    raise ValueError(f"block sizes must be positive, got {block_q} and {block_k}")
  return _attention(q, k, v, key_mask, block_q, block_k)
