"""Token-level divergences for on-policy context distillation (DESIGN.md section 5.3).

Pure, jittable library functions. Shapes follow one convention throughout: logits are
`[B, T, V]` (any leading dimensions work: `[..., V]`), masks are `[B, T]` (the logits'
leading dimensions), per-token values are `[B, T]`, and means are float32 scalars. Inputs may
be any float dtype; every computation on logits runs in float32.

The divergences, per token position, with `T` the sampling temperature applied to both
models' logits and log-softmax taken over the full vocabulary:

    ls = log_softmax(student_logits / T)      lt = log_softmax(teacher_logits / T)

- `topk_reverse_kl` (OEL's consolidation loss; the official code's `kl_loss_type=full`,
  `kl_topk=256`, `on_policy_merge=True`): S = the student's top-k indices of `ls`, chosen
  under `stop_gradient`;

      D = sum_{i in S} exp(ls_i) * (ls_i - lt_i).

  Gradients flow through both `exp(ls)` and `ls`; the teacher gets none. There is no
  renormalisation over S unless `renormalize=True`, which replaces `ls` and `lt` on S by
  their log-softmax over S (both distributions renormalised to sum to one on S).
  `k=0`, or `k >= V`, is the exact full-vocabulary reverse KL.

  The truncated sum is no divergence: it can be negative, and its minimum is not at
  student == teacher (it also pushes mass into S). `tail=True` (opt-in; not the official
  loss) adds one bucket for the mass outside S, i.e. the exact KL between the two
  distributions coarse-grained to S plus a tail,

      D = sum_{i in S} p_i (ls_i - lt_i) + p_tail (log p_tail - log q_tail),

  with p = exp(ls), q = exp(lt), p_tail = 1 - sum_S p, q_tail = 1 - sum_S q: >= 0, and 0
  exactly when the coarse-grained distributions agree. The tail log-masses are log-sum-exps
  over the complement of S (never `log(1 - sum)`, which float32 rounds to log 0 when S holds
  nearly all the mass); a tail of mass 0 contributes 0. It cannot be combined with
  `renormalize` (renormalised over S there is no tail). The union form takes it too; the
  forward KL does not.
- `union_topk_reverse_kl` (the official `kl_merge_indice=True` ablation): the same sum over
  S = (student top-k) union (teacher top-k), each index counted once.
- `forward_kl` (off-policy context distillation, the paper's baseline; the official code's
  `on_policy_merge=False`): the tokens were sampled by the teacher, and per position

      D = sum_{i in S} exp(lt_i) * (lt_i - ls_i)      (KL(teacher || student))

  with S = the teacher's top-k of `lt` (`k=0` or `k >= V`: the full vocabulary). Gradient
  flows through `ls` only.

Token means (`topk_reverse_kl`, ...) are `sum(mask * D) / sum(mask)` over the whole batch
("token-mean"); an all-zero mask gives 0 (and zero gradient), not NaN.

For training at Qwen3's vocabulary (151,936) the `*_from_hidden` forms take the final hidden
states and the unembedding instead of logits and never hold `[B, T, V]` logits. The forward
pass works through the flattened tokens in chunks of `chunk_size` (each chunk's logits a
float32-accumulated matmul) and keeps only per-token residuals (the support, the gradient on
it, log-normalisers). The backward pass is a custom VJP that recomputes the student's logits
in `[chunk_size, vocab_chunk_size]` blocks, vocabulary tiles outer and token chunks inner (the
pattern of MaxText's vocabulary tiling), so that each tile of the unembedding's gradient is
accumulated in float32 over all tokens and written once. They give the same values and
gradients as the logits forms.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TOPK_REVERSE_KL = "topk_reverse_kl"
UNION_TOPK_REVERSE_KL = "union_topk_reverse_kl"
FORWARD_KL = "forward_kl"
DIVERGENCES = (TOPK_REVERSE_KL, UNION_TOPK_REVERSE_KL, FORWARD_KL)

__all__ = [
    "DIVERGENCES",
    "FORWARD_KL",
    "TOPK_REVERSE_KL",
    "UNION_TOPK_REVERSE_KL",
    "TokenStats",
    "entropy_from_log_probs",
    "entropy_from_logits",
    "forward_kl",
    "forward_kl_per_token",
    "masked_mean",
    "per_token_divergence",
    "per_token_divergence_from_hidden",
    "topk_reverse_kl",
    "topk_reverse_kl_from_hidden",
    "topk_reverse_kl_per_token",
    "union_topk_reverse_kl",
    "union_topk_reverse_kl_per_token",
]


# ----------------------------------------------------------------------------------------
# Validation.


def _check_divergence(divergence):
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def _check_k(k):
  if isinstance(k, bool) or not isinstance(k, numbers.Integral):
    raise ValueError(f"k must be a Python int (0 = full vocabulary), got {k!r} "
                     f"of type {type(k).__name__}")
  if k < 0:
    raise ValueError(f"k must be >= 0 (0 = full vocabulary), got {k}")
  return int(k)


def _check_temperature(temperature):
  """Checks a concrete temperature; a traced one passes unchecked."""
  if isinstance(temperature, jax.core.Tracer):
    return
  try:
    value = float(np.asarray(temperature))
  except (TypeError, ValueError) as e:
    raise ValueError(f"temperature must be a positive scalar, got {temperature!r}") from e
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"temperature must be a finite number > 0, got {value}")


def _check_tail(tail, renormalize, divergence):
  if not isinstance(tail, (bool, np.bool_)):
    raise ValueError(f"tail must be a bool, got {tail!r}")
  if tail and divergence == FORWARD_KL:
    # Its gradient on S, q_tail p_i / p_tail, is huge when the student's tail is tiny and
    # cancels against the log-softmax's dense term; no stable form is implemented.
    raise ValueError("tail=True is implemented for the reverse-KL divergences "
                     f"({TOPK_REVERSE_KL!r}, {UNION_TOPK_REVERSE_KL!r}), not for "
                     f"{FORWARD_KL!r}")
  if tail and renormalize:
    raise ValueError("tail=True cannot be combined with renormalize=True: renormalised over "
                     "the support S, both distributions put no mass outside S, so there is "
                     "no tail bucket; use one or the other")
  return bool(tail)


def _check_float(name, x):
  dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype, got {dtype}")


def _check_logits(student_logits, teacher_logits, mask=None):
  s_shape = tuple(jnp.shape(student_logits))
  t_shape = tuple(jnp.shape(teacher_logits))
  if len(s_shape) < 1 or s_shape[-1] < 1:
    raise ValueError(f"student_logits must be [B, T, V] with V >= 1, got shape {s_shape}")
  if s_shape != t_shape:
    raise ValueError(f"student_logits and teacher_logits must have the same shape "
                     f"[B, T, V]; got student_logits {s_shape} and teacher_logits {t_shape}")
  _check_float("student_logits", student_logits)
  _check_float("teacher_logits", teacher_logits)
  if mask is not None:
    m_shape = tuple(jnp.shape(mask))
    if m_shape != s_shape[:-1]:
      raise ValueError(f"mask must have the logits' leading shape {s_shape[:-1]} "
                       f"(logits {s_shape}), got mask shape {m_shape}")


def _check_hidden(student_hidden, student_unembed, teacher_hidden, teacher_unembed,
                  mask=None):
  hs, ws = tuple(jnp.shape(student_hidden)), tuple(jnp.shape(student_unembed))
  ht, wt = tuple(jnp.shape(teacher_hidden)), tuple(jnp.shape(teacher_unembed))
  for name, shape in (("student_unembed", ws), ("teacher_unembed", wt)):
    if len(shape) != 2:
      raise ValueError(f"{name} must be [V, H] (vocab-major), got shape {shape}")
  for name, shape in (("student_hidden", hs), ("teacher_hidden", ht)):
    if len(shape) < 2:
      raise ValueError(f"{name} must be [B, T, H], got shape {shape}")
  if hs[-1] != ws[1]:
    raise ValueError(f"student_hidden width {hs[-1]} (shape {hs}) does not match "
                     f"student_unembed [V, H] = {ws}")
  if ht[-1] != wt[1]:
    raise ValueError(f"teacher_hidden width {ht[-1]} (shape {ht}) does not match "
                     f"teacher_unembed [V, H'] = {wt}")
  if ws[0] != wt[0]:
    raise ValueError(f"student and teacher vocabularies differ: student_unembed {ws}, "
                     f"teacher_unembed {wt}")
  if hs[:-1] != ht[:-1]:
    raise ValueError(f"student_hidden {hs} and teacher_hidden {ht} must have the same "
                     f"leading [B, T] shape")
  for name, x in (("student_hidden", student_hidden), ("student_unembed", student_unembed),
                  ("teacher_hidden", teacher_hidden), ("teacher_unembed", teacher_unembed)):
    _check_float(name, x)
  if mask is not None:
    m_shape = tuple(jnp.shape(mask))
    if m_shape != hs[:-1]:
      raise ValueError(f"mask must have the hidden states' leading shape {hs[:-1]} "
                       f"(student_hidden {hs}), got mask shape {m_shape}")


# ----------------------------------------------------------------------------------------
# Core pieces shared by the logits and the hidden-state forms.


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


def _per_token_from_logits(divergence, k, renormalize, tail, student_logits, teacher_logits,
                           temperature):
  ls = _log_probs(student_logits, temperature)
  lt = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
  idx, valid = _support(divergence, k, ls, lt)
  # Over the full vocabulary the tail is empty: the sum is already the exact KL.
  tails = _tail_log_masses(ls, lt, idx) if tail and idx is not None else None
  return _divergence_on_support(divergence, renormalize, _gather(ls, idx), _gather(lt, idx),
                                valid, tails)


# ----------------------------------------------------------------------------------------
# Public: logits forms.


def masked_mean(values, mask):
  """Token-mean `sum(mask * values) / sum(mask)` as float32; 0 when the mask is all zero.

  Args:
    values: `[B, T]` per-token values.
    mask: `[B, T]`, bool or numeric (numeric masks act as weights).

  Returns:
    float32 scalar. Masked-out positions never contribute, even if their value is inf/NaN.
  """
  if tuple(jnp.shape(values)) != tuple(jnp.shape(mask)):
    raise ValueError(f"values and mask must have the same shape, got values "
                     f"{tuple(jnp.shape(values))} and mask {tuple(jnp.shape(mask))}")
  w = jnp.asarray(mask).astype(jnp.float32)
  on = w != 0
  total = jnp.sum(jnp.where(on, jnp.asarray(values, jnp.float32) * w, 0.0))
  count = jnp.sum(w)
  return jnp.where(count != 0, total / jnp.where(count != 0, count, 1.0), 0.0)


def per_token_divergence(student_logits, teacher_logits, *, divergence=TOPK_REVERSE_KL,
                         k=256, temperature=1.0, renormalize=False, tail=False):
  """Per-token divergence `[B, T]` of one of `DIVERGENCES` (module docstring).

  Args:
    student_logits: `[B, T, V]`, any float dtype; differentiable.
    teacher_logits: `[B, T, V]`; treated as constant (stop-gradient).
    divergence: `"topk_reverse_kl"`, `"union_topk_reverse_kl"` or `"forward_kl"`.
    k: top-k size (Python int); 0 or >= V means the full vocabulary.
    temperature: divides both models' logits before the log-softmax; > 0.
    renormalize: renormalise both distributions over the support S.
    tail: add the tail bucket (the KL of the distributions coarse-grained to S plus one
      bucket for the rest; module docstring). Reverse-KL divergences only; not with
      `renormalize`.

  Returns:
    float32 `[B, T]`.
  """
  _check_divergence(divergence)
  k = _check_k(k)
  _check_temperature(temperature)
  tail = _check_tail(tail, renormalize, divergence)
  _check_logits(student_logits, teacher_logits)
  return _per_token_from_logits(divergence, k, bool(renormalize), tail, student_logits,
                                teacher_logits, temperature)


def topk_reverse_kl_per_token(student_logits, teacher_logits, *, k=256, temperature=1.0,
                              renormalize=False, tail=False):
  """Per-token top-k reverse KL `[B, T]`: sum over the student's top-k S of
  `exp(ls_i) (ls_i - lt_i)`, plus the tail bucket with `tail` (module docstring). Logits
  `[B, T, V]`."""
  return per_token_divergence(student_logits, teacher_logits, divergence=TOPK_REVERSE_KL,
                              k=k, temperature=temperature, renormalize=renormalize,
                              tail=tail)


def topk_reverse_kl(student_logits, teacher_logits, mask, *, k=256, temperature=1.0,
                    renormalize=False, tail=False):
  """OEL's consolidation loss: token-mean over `mask` of the top-k reverse KL.

  Per position, with `ls = log_softmax(student_logits / temperature)` and
  `lt = log_softmax(teacher_logits / temperature)` over the full vocabulary and S the
  student's top-k of `ls` (chosen without gradient): `D = sum_{i in S} exp(ls_i) (ls_i -
  lt_i)`. Gradient flows through `exp(ls)` and `ls`; the teacher gets none.

  Args:
    student_logits: `[B, T, V]`, any float dtype (computed in float32).
    teacher_logits: `[B, T, V]`.
    mask: `[B, T]`, 1 on the tokens to average over (response tokens), 0 elsewhere.
    k: top-k size; 0 or >= V gives the exact full-vocabulary reverse KL.
    temperature: sampling temperature applied to both models' logits; > 0.
    renormalize: renormalise both distributions over S before the sum.
    tail: add `p_tail (log p_tail - log q_tail)` for the mass outside S, making D the KL
      of the distributions coarse-grained to S plus a tail bucket (>= 0; opt-in, not the
      official loss). Not with `renormalize`.

  Returns:
    float32 scalar; 0 for an all-zero mask.
  """
  _check_logits(student_logits, teacher_logits, mask)
  per_token = topk_reverse_kl_per_token(student_logits, teacher_logits, k=k,
                                        temperature=temperature, renormalize=renormalize,
                                        tail=tail)
  return masked_mean(per_token, mask)


def union_topk_reverse_kl_per_token(student_logits, teacher_logits, *, k=256,
                                    temperature=1.0, renormalize=False, tail=False):
  """Per-token reverse KL `[B, T]` over S = student top-k union teacher top-k (each index
  once): `sum_{i in S} exp(ls_i) (ls_i - lt_i)`, plus the tail bucket with `tail`. Logits
  `[B, T, V]`."""
  return per_token_divergence(student_logits, teacher_logits,
                              divergence=UNION_TOPK_REVERSE_KL, k=k, temperature=temperature,
                              renormalize=renormalize, tail=tail)


def union_topk_reverse_kl(student_logits, teacher_logits, mask, *, k=256, temperature=1.0,
                          renormalize=False, tail=False):
  """Token-mean over `mask` `[B, T]` of `union_topk_reverse_kl_per_token`; float32 scalar."""
  _check_logits(student_logits, teacher_logits, mask)
  return masked_mean(
      union_topk_reverse_kl_per_token(student_logits, teacher_logits, k=k,
                                      temperature=temperature, renormalize=renormalize,
                                      tail=tail),
      mask)


def forward_kl_per_token(student_logits, teacher_logits, *, k=256, temperature=1.0,
                         renormalize=False):
  """Per-token forward KL(teacher || student) `[B, T]`, for off-policy context distillation.

  On tokens the teacher sampled, per position: `sum_{i in S} exp(lt_i) (lt_i - ls_i)` with
  S the teacher's top-k of `lt` (k=0 or k >= V: the full vocabulary, the exact forward KL),
  `ls`, `lt` the temperature-scaled full-vocabulary log-softmaxes. With `renormalize`, both
  are renormalised over S first. Gradient flows through `ls` only.
  """
  return per_token_divergence(student_logits, teacher_logits, divergence=FORWARD_KL, k=k,
                              temperature=temperature, renormalize=renormalize)


def forward_kl(student_logits, teacher_logits, mask, *, k=256, temperature=1.0,
               renormalize=False):
  """Token-mean over `mask` `[B, T]` of `forward_kl_per_token`; float32 scalar.

  This is the off-policy context-distillation baseline: `mask` marks the positions of the
  teacher-sampled response; the teacher's logits are constants.
  """
  _check_logits(student_logits, teacher_logits, mask)
  return masked_mean(
      forward_kl_per_token(student_logits, teacher_logits, k=k, temperature=temperature,
                           renormalize=renormalize),
      mask)


def entropy_from_log_probs(log_probs):
  """Entropy `-sum exp(lp) lp` over the last axis, float32; `[..., V]` -> `[...]`.

  `log_probs` must be normalised log-probabilities; -inf entries contribute 0.
  """
  return _entropy(jnp.asarray(log_probs, jnp.float32))


def entropy_from_logits(logits, *, temperature=1.0):
  """Entropy of `softmax(logits / temperature)` over the last axis; `[..., V]` -> `[...]`.

  float32. The official code logs this (token-mean over the response mask) for the student
  and for the teacher, at the sampling temperature.
  """
  _check_temperature(temperature)
  _check_float("logits", logits)
  return _entropy(_log_probs(logits, temperature))


# ----------------------------------------------------------------------------------------
# Hidden-state (chunked, memory-bounded) forms.


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
  n_tiles = -(-vocab // tile)
  chunk = hs.shape[1]
  mm_dtype = jnp.result_type(hs.dtype, ws.dtype)
  dense_coef = g_tok * saved["sum_g"]  # [n, C]: multiplies q
  if sparse:
    chunk_xs = (hs, saved["lse_s"], dense_coef, saved["idx"], g_tok[..., None] * saved["g"])
  else:
    chunk_xs = (hs, saved["lse_s"], dense_coef, ht, saved["lse_t"], g_tok)

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
    if not sparse:
      wt_j = to_wt(jax.lax.dynamic_slice_in_dim(wt_v, start, tile, axis=0))

    def chunk_body(acc, xs):
      if sparse:
        hs_c, lse_c, coef_c, idx_c, u_c = xs
      else:
        hs_c, lse_c, coef_c, ht_c, lse_t_c, g_c = xs
      s = _chunk_logits(hs_c, ws_j) / temperature  # [C, tile]
      q = jnp.exp(s - lse_c[:, None])
      if sparse:
        local = idx_c - start
        local = jnp.where((local >= 0) & (local < tile), local, tile)  # tile = dropped
        rows = jnp.broadcast_to(jnp.arange(chunk)[:, None], local.shape)
        point = jnp.zeros(s.shape, jnp.float32).at[rows, local].add(u_c, mode="drop")
      else:
        ls = s - lse_c[:, None]
        lt = _chunk_logits(ht_c, wt_j) / temperature - lse_t_c[:, None]
        _, vjp = jax.vjp(lambda a: _divergence_on_support(cfg.divergence, False, a, lt, None),
                         ls)
        (point,) = vjp(g_c)
      dz = (point - q * coef_c[:, None]) / temperature
      dz = jnp.where(fresh[None, :], dz, 0.0).astype(mm_dtype)
      acc = acc + jnp.einsum("cv,ch->vh", dz, hs_c, preferred_element_type=jnp.float32)
      dh_c = jnp.einsum("cv,vh->ch", dz, ws_j, preferred_element_type=jnp.float32)
      return acc, dh_c

    acc, dh_j = jax.lax.scan(chunk_body, jnp.zeros((tile, ws.shape[1]), jnp.float32),
                             chunk_xs)
    new = _sliceable(acc.astype(ws.dtype))[0]
    dw_v = jax.lax.dynamic_update_slice_in_dim(dw_v, new, start, axis=0)
    return (dw_v, dh + dh_j), None

  init = (dw_v, jnp.zeros(hs.shape, jnp.float32))
  (dw_v, dh), _ = jax.lax.scan(tile_body, init, jnp.arange(n_tiles), reverse=True)
  return (dh.astype(hs.dtype), to_dw(dw_v), jnp.zeros_like(ht), jnp.zeros_like(wt),
          jnp.zeros_like(temperature))


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


def _check_chunk(name, value):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


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
  lead = tuple(student_hidden.shape[:-1])
  n_tokens = math.prod(lead)
  chunk = min(chunk_size, max(n_tokens, 1))
  n_chunks = -(-n_tokens // chunk)
  pad = n_chunks * chunk - n_tokens

  def to_chunks(x):
    x = x.reshape(n_tokens, x.shape[-1])
    x = jnp.pad(x, ((0, pad), (0, 0)))
    return x.reshape(n_chunks, chunk, x.shape[-1])

  cfg = _ChunkConfig(divergence, k, bool(renormalize), tail, bool(with_entropy),
                     vocab_chunk_size)
  temperature = jnp.asarray(temperature, jnp.float32)
  outs = _chunked_per_token(cfg, to_chunks(student_hidden), student_unembed,
                            to_chunks(teacher_hidden), teacher_unembed, temperature)

  def from_chunks(x):
    return x.reshape(n_chunks * chunk)[:n_tokens].reshape(lead)

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
