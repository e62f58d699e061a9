"""The losses on `[B, T, V]` logits: per-token divergences, token means, entropies."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from oel_jax.losses.checks import (FORWARD_KL, TOPK_REVERSE_KL, UNION_TOPK_REVERSE_KL,
                                   _check_divergence, _check_float, _check_k, _check_logits,
                                   _check_tail, _check_temperature)
from oel_jax.losses.core import (_divergence_on_support, _entropy, _gather, _log_probs,
                                 _support, _tail_log_masses)


def _per_token_from_logits(divergence, k, renormalize, tail, student_logits, teacher_logits,
                           temperature):
  ls = _log_probs(student_logits, temperature)
  lt = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
  idx, valid = _support(divergence, k, ls, lt)
  # Over the full vocabulary the tail is empty: the sum is already the exact KL.
  tails = _tail_log_masses(ls, lt, idx) if tail and idx is not None else None
  return _divergence_on_support(divergence, renormalize, _gather(ls, idx), _gather(lt, idx),
                                valid, tails)


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
