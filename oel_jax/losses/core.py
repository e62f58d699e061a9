"""Per-token pieces shared by the logits and the hidden-state forms.

The support S a divergence sums over, the terms of the sum on S, the tail bucket, the mass on
S and the entropy; all on float32 log-probs `[..., V]` or their gathered `[..., K]` values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from oel_jax.losses.checks import FORWARD_KL, TOPK_REVERSE_KL, UNION_TOPK_REVERSE_KL


def _log_probs(logits, temperature):
  """float32 log_softmax(logits / temperature) over the last axis."""
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _is_full(k, vocab):
  return k == 0 or k >= vocab


def _support_size(divergence, k, vocab):
  """Width of the gathered support, or None for the full vocabulary."""
  if _is_full(k, vocab):
    return None
  return 2 * k if divergence == UNION_TOPK_REVERSE_KL else k


def _support(divergence, k, ls, lt):
  """Support indices `[..., K]` and validity `[..., K]` (or None, None for full vocab).

  Inputs are float32 `[..., V]` log-probs, or anything that orders the vocabulary the same
  way per token (the raw logits, as the temperature is positive); selection happens without
  gradient.
  """
  if _is_full(k, ls.shape[-1]):
    return None, None
  ls = jax.lax.stop_gradient(ls)
  lt = jax.lax.stop_gradient(lt)
  if divergence == TOPK_REVERSE_KL:
    idx = jax.lax.top_k(ls, k)[1]
    return idx, jnp.ones(idx.shape, bool)
  if divergence == FORWARD_KL:
    idx = jax.lax.top_k(lt, k)[1]
    return idx, jnp.ones(idx.shape, bool)
  # Union: concatenate both top-k sets, sort, and mark repeats invalid.
  both = jnp.concatenate([jax.lax.top_k(ls, k)[1], jax.lax.top_k(lt, k)[1]], axis=-1)
  both = jnp.sort(both, axis=-1)
  first = jnp.ones(both.shape[:-1] + (1,), bool)
  valid = jnp.concatenate([first, both[..., 1:] != both[..., :-1]], axis=-1)
  return both, valid


def _gather(x, idx):
  return x if idx is None else jnp.take_along_axis(x, idx, axis=-1)


def _masked_log_softmax(x, valid):
  if valid is None:
    return jax.nn.log_softmax(x, axis=-1)
  return jax.nn.log_softmax(jnp.where(valid, x, -jnp.inf), axis=-1)


def _kl_terms(log_p, log_q, valid):
  """sum_i exp(log_p_i) * (log_p_i - log_q_i) over valid entries; 0 * log 0 = 0.

  Entries with p = 0 contribute 0 with a finite (zero) gradient even where the log-probs
  are -inf. NaN inputs stay NaN (a NaN loss must be seen, not hidden).
  """
  live = log_p != -jnp.inf
  if valid is not None:
    live = live & valid
  lp = jnp.where(live, log_p, 0.0)
  lq = jnp.where(live, log_q, 0.0)
  return jnp.sum(jnp.where(live, jnp.exp(lp) * (lp - lq), 0.0), axis=-1)


def _outside_support(idx, shape):
  """`[..., V]` bool: True off the support `idx` `[..., K]`."""
  inside = jnp.put_along_axis(jnp.zeros(shape, bool), idx, True, axis=-1, inplace=False)
  return ~inside


def _tail_log_masses(ls, lt, idx):
  """(log p_tail, log q_tail) `[...]`: log-masses off the support of full log-probs `[..., V]`.

  A log-sum-exp over the complement, so a tiny tail keeps its precision (1 - sum_S p would
  round to 0 in float32); an empty or zero-probability complement gives -inf. No gradient:
  `_tail_term` carries the tails' dependence on the student's log-probs on S.
  """
  outside = _outside_support(idx, ls.shape)
  ls, lt = jax.lax.stop_gradient(ls), jax.lax.stop_gradient(lt)
  return tuple(jax.nn.logsumexp(jnp.where(outside, x, -jnp.inf), axis=-1) for x in (ls, lt))


@jax.custom_jvp
def _tail_term(ls_s, live, log_p_tail, log_q_tail):
  """The tail bucket p_tail (log p_tail - log q_tail) `[...]` of the coarse-grained reverse KL.

  A function of the student's log-probs on S, `ls_s` `[..., K]` (`live` marks the entries
  that count): `log_p_tail`, `log_q_tail` `[...]` are the precise values
  (`_tail_log_masses`), and the derivative treats the student's as what it is, a function of
  its mass on S: p_tail = 1 - sum_{i in S, live} exp(ls_s_i). A tail of mass 0 gives 0.
  """
  del ls_s, live
  return jnp.where(log_p_tail == -jnp.inf, 0.0,
                   jnp.exp(log_p_tail) * (log_p_tail - log_q_tail))


@_tail_term.defjvp
def _tail_term_jvp(primals, tangents):
  ls_s, live, log_p_tail, log_q_tail = primals
  d_ls = tangents[0]  # the tails' own tangents are zero (stop-gradient)
  out = _tail_term(*primals)
  a, b = log_p_tail[..., None], log_q_tail[..., None]
  on = live & (ls_s != -jnp.inf)
  # d/dls_i of p_tail (a - b), with dp_tail/dls_i = -p_i: -p_i (a - b + 1). It is 0 for an
  # empty tail (a = -inf): p_tail then stays 0 whatever the logits on S do. |a - b| is at
  # most the logits' range / T, so this stays of the size of the sum's own gradient.
  coef = jnp.where(on & (a != -jnp.inf),
                   -jnp.exp(jnp.where(on, ls_s, 0.0)) * (a - b + 1.0), 0.0)
  return out, jnp.sum(coef * d_ls, axis=-1)


def _divergence_on_support(divergence, renormalize, ls_s, lt_s, valid, tails=None):
  """Per-token divergence from student/teacher log-probs gathered on the support.

  `tails`: None, or (log p_tail, log q_tail) `[...]` from `_tail_log_masses` to add the tail
  bucket (reverse KL only, never with `renormalize`).
  """
  if renormalize:
    ls_s = _masked_log_softmax(ls_s, valid)
    lt_s = _masked_log_softmax(lt_s, valid)
  if divergence == FORWARD_KL:
    d = _kl_terms(lt_s, ls_s, valid)
  else:
    d = _kl_terms(ls_s, lt_s, valid)
  if tails is not None:
    live = jnp.ones(ls_s.shape, bool) if valid is None else valid
    d = d + _tail_term(ls_s, live, *tails)
  return d


def _support_masses(ls_s, lt_s, valid):
  """Student's and teacher's probability mass `[...]` on the support (log-probs `[..., K]`).

  Exactly 1 for the full vocabulary (`valid` None).
  """
  if valid is None:
    return jnp.ones(ls_s.shape[:-1], jnp.float32), jnp.ones(ls_s.shape[:-1], jnp.float32)
  return tuple(jnp.sum(jnp.where(valid, jnp.exp(x), 0.0), axis=-1) for x in (ls_s, lt_s))


def _entropy(log_probs):
  live = log_probs != -jnp.inf
  lp = jnp.where(live, log_probs, 0.0)
  return -jnp.sum(jnp.where(live, jnp.exp(lp) * lp, 0.0), axis=-1)
