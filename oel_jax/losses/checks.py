"""The divergences' names, and the checks every loss function runs on its arguments."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

TOPK_REVERSE_KL = "topk_reverse_kl"
UNION_TOPK_REVERSE_KL = "union_topk_reverse_kl"
FORWARD_KL = "forward_kl"
DIVERGENCES = (TOPK_REVERSE_KL, UNION_TOPK_REVERSE_KL, FORWARD_KL)


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


def _check_chunk(name, value):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)
