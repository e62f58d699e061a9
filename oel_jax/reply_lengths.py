"""A sampler whose reply lengths follow a stated distribution, for tests and benchmarks.

A thinking model's replies have a heavy tail (most end after a few hundred tokens, some run
into the 1,024-token budget); a random tiny model's almost never stop. `LognormalLengthSampler`
is a `Sampler` that keeps the model's tokens but forces where each reply stops: a reply
seeded with key ``k`` is ``L(k) = ceil(exp(log(median) + sigma * z))`` tokens long, the
stop token included, with ``z`` the standard normal of ``fold_in(k, LENGTH_STREAM)``: the
stop token is forbidden before token ``L(k)`` and forced there (replies longer than the
budget end at it, "length"). The length depends on the row's seed alone, so it is the same
in every batch and in every decode path (`generate`, `oel_jax.slots`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from oel_jax.sampling import Sampler

LENGTH_STREAM = 2 ** 31 - 1
"""The fold-in index of a row's key whose normal sets its reply length (the token draws
use the indices 0, 1, ... of the same key; a reply never gets this long)."""

_FORBIDDEN = -1e30


def lognormal_length(keys: jax.Array, median: float, sigma: float) -> jax.Array:
  """Reply lengths `[B]` int32 (>= 1, stop token included) of rows with keys `[B]`."""
  z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, LENGTH_STREAM)))(keys)
  length = jnp.ceil(jnp.exp(math.log(median) + sigma * z))
  return jnp.clip(length, 1, 2 ** 30).astype(jnp.int32)


class LognormalLengthSampler(Sampler):
  """A `Sampler` whose replies stop after a lognormal number of tokens (see the module).

  Args:
    median: the median reply length in tokens (stop token included).
    sigma: the standard deviation of the log length (1.0: a tenth of the replies exceed
      3.6x the median, one in a hundred 10x).
    **kwargs: those of `Sampler`; the first of ``eos_ids`` is the forced stop token.
  """

  def __init__(self, model, *, median: float, sigma: float, **kwargs):
    if not median >= 1 or not sigma >= 0:
      raise ValueError(f"LognormalLengthSampler: median must be >= 1 and sigma >= 0, got "
                       f"median={median}, sigma={sigma}")
    super().__init__(model, **kwargs)
    self.median, self.sigma = float(median), float(sigma)

  def _logits(self, model, hidden, keys, step):
    logits = super()._logits(model, hidden, keys, step)
    length = lognormal_length(keys, self.median, self.sigma)
    stop_now = (jnp.broadcast_to(step, length.shape) == length - 1)[:, None]  # [B, 1]
    is_eos = jnp.isin(jnp.arange(logits.shape[-1]), jnp.asarray(self.eos_ids))  # [V]
    forced = jnp.where(jnp.arange(logits.shape[-1]) == self.eos_ids[0], 0.0, _FORBIDDEN)
    return jnp.where(stop_now, forced, jnp.where(is_eos, _FORBIDDEN, logits))
