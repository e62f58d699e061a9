"""The losses from final hidden states and unembeddings, never holding `[B, T, V]` logits."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from oel_jax.losses.checks import (TOPK_REVERSE_KL, _check_chunk, _check_divergence,
                                   _check_hidden, _check_k, _check_tail, _check_temperature)
from oel_jax.losses.chunked import _ChunkConfig, _chunked_per_token
from oel_jax.losses.logits import masked_mean


class TokenStats(NamedTuple):
  """Per-token outputs of `per_token_divergence_from_hidden`, each float32 `[B, T]`.

  Only `divergence` carries a gradient. `student_entropy` and `teacher_entropy` are the
  entropies of the temperature-scaled full-vocabulary distributions, zeros unless requested.
  `student_support_mass` and `teacher_support_mass` are the two distributions'
  (temperature-scaled, full-vocabulary) probability mass on the loss's support S (the
  student's top-k for the reverse KL, the union for the union form, the teacher's top-k for
  the forward KL), always computed (a sum of K exps per token); exactly 1 for the full
  vocabulary. A student mass near 1 means the truncated sum is close to the full KL.
  """
  divergence: jax.Array
  student_entropy: jax.Array
  teacher_entropy: jax.Array
  student_support_mass: jax.Array
  teacher_support_mass: jax.Array


def _token_chunking(lead, chunk_size):
  """`(to_chunks, from_chunks)` for tokens of leading shape `lead` (e.g. `[B, T]`).

  `to_chunks`: `[*lead, H]` -> `[n, C, H]`, the tokens flattened and the last chunk
  zero-padded. `from_chunks`: per-token values `[n, C]` -> `[*lead]`, the padding dropped.
  """
  n_tokens = math.prod(lead)
  chunk = min(chunk_size, max(n_tokens, 1))
  n_chunks = -(-n_tokens // chunk)
  pad = n_chunks * chunk - n_tokens

  def to_chunks(x):
    x = x.reshape(n_tokens, x.shape[-1])
    x = jnp.pad(x, ((0, pad), (0, 0)))
    return x.reshape(n_chunks, chunk, x.shape[-1])

  def from_chunks(x):
    return x.reshape(n_chunks * chunk)[:n_tokens].reshape(lead)

  return to_chunks, from_chunks


def per_token_divergence_from_hidden(student_hidden, student_unembed, teacher_hidden,
                                     teacher_unembed, *, divergence=TOPK_REVERSE_KL, k=256,
                                     temperature=1.0, renormalize=False, tail=False,
                                     chunk_size=256, vocab_chunk_size=8192,
                                     with_entropy=False):
  """Per-token divergence from final hidden states, without materialising `[B, T, V]`.

  Equal in value and gradient to `per_token_divergence(student_hidden @ student_unembed.T,
  teacher_hidden @ teacher_unembed.T, ...)`. Tokens are flattened and processed
  `chunk_size` at a time (the last chunk zero-padded); each chunk's logits are a matmul in
  the inputs' dtype with float32 accumulation. The backward pass is a custom VJP that
  recomputes the student's logits in `[chunk_size, vocab_chunk_size]` blocks (vocabulary
  tiles outer, token chunks inner) and writes each tile of the unembedding's gradient once,
  accumulated in float32 over all tokens. For a top-k support only per-token `[N, K]`
  residuals are kept from the forward pass; for the full vocabulary the teacher's logits
  blocks are recomputed too. Peak extra memory: a few `[chunk_size, V]` float32 buffers
  (forward) or `[chunk_size, vocab_chunk_size]` ones (backward), the `[B*T, K]` residuals,
  and float32 `[B*T, H]` for the hidden states' gradient.

  Args:
    student_hidden: `[B, T, H]` final (normed) hidden states of the student; differentiable.
    student_unembed: `[V, H]` student unembedding (vocab-major; possibly the tied
      embedding); differentiable.
    teacher_hidden: `[B, T, H']`; no gradient.
    teacher_unembed: `[V, H']`; no gradient.
    divergence: one of `DIVERGENCES`.
    k: top-k size; 0 or >= V means the full vocabulary.
    temperature: > 0, applied to both models' logits.
    renormalize: renormalise both distributions over the support.
    tail: add the tail bucket (module docstring); reverse-KL divergences only, not with
      `renormalize`. The tail log-masses cost one masked log-sum-exp more over each chunk's
      logits per model.
    chunk_size: tokens per chunk (any positive int; need not divide B*T).
    vocab_chunk_size: vocabulary rows per tile in the backward pass (need not divide V).
    with_entropy: also compute both models' full-vocabulary entropies (no gradient).

  Returns:
    `TokenStats` of float32 `[B, T]` arrays.
  """
  _check_divergence(divergence)
  k = _check_k(k)
  _check_temperature(temperature)
  tail = _check_tail(tail, renormalize, divergence)
  _check_hidden(student_hidden, student_unembed, teacher_hidden, teacher_unembed)
  chunk_size = _check_chunk("chunk_size", chunk_size)
  vocab_chunk_size = _check_chunk("vocab_chunk_size", vocab_chunk_size)
  to_chunks, from_chunks = _token_chunking(tuple(student_hidden.shape[:-1]), chunk_size)
  cfg = _ChunkConfig(divergence, k, bool(renormalize), tail, bool(with_entropy),
                     vocab_chunk_size)
  temperature = jnp.asarray(temperature, jnp.float32)
  outs = _chunked_per_token(cfg, to_chunks(student_hidden), student_unembed,
                            to_chunks(teacher_hidden), teacher_unembed, temperature)
  div, *stats = (from_chunks(x) for x in outs)
  return TokenStats(div, *(jax.lax.stop_gradient(x) for x in stats))


def topk_reverse_kl_from_hidden(student_hidden, student_unembed, teacher_hidden,
                                teacher_unembed, mask, *, k=256, temperature=1.0,
                                renormalize=False, tail=False, chunk_size=256,
                                vocab_chunk_size=8192):
  """`topk_reverse_kl` computed from hidden states in token chunks (memory-bounded).

  Equal in value and gradient to `topk_reverse_kl(student_hidden @ student_unembed.T,
  teacher_hidden @ teacher_unembed.T, mask, ...)` but never holds `[B, T, V]` logits; see
  `per_token_divergence_from_hidden`.

  Args:
    student_hidden: `[B, T, H]`, e.g. bf16; gradient flows to it.
    student_unembed: `[V, H]`; gradient flows to it.
    teacher_hidden: `[B, T, H']`; no gradient.
    teacher_unembed: `[V, H']`; no gradient.
    mask: `[B, T]` response-token mask.
    k, temperature, renormalize, tail: as in `topk_reverse_kl`.
    chunk_size: tokens per chunk.
    vocab_chunk_size: vocabulary rows per tile in the backward pass.

  Returns:
    float32 scalar; 0 for an all-zero mask.
  """
  _check_hidden(student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask)
  stats = per_token_divergence_from_hidden(
      student_hidden, student_unembed, teacher_hidden, teacher_unembed,
      divergence=TOPK_REVERSE_KL, k=k, temperature=temperature, renormalize=renormalize,
      tail=tail, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
  return masked_mean(stats.divergence, mask)
