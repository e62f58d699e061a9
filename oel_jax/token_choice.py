"""Choosing the next token from logits: temperature, then top-k, then top-p (nucleus).

The order of transformers' and vLLM's samplers. `sample_next` picks, per row, the cheapest
exact method for its settings (greedy, the whole vocabulary, a partial sort of the top
`SMALL_TOP_K_CAP` or `TOP_K_CAP` tokens, or a full sort) inside one traced program, so the
settings are data, not compile-time constants. The log-probability returned with each token
is its log probability under exactly the distribution it was drawn from; for greedy
decoding it is the model's own log-softmax at temperature 1. `oel_jax.sampling.Sampler`
calls it once per decode step.
"""

import jax
import jax.numpy as jnp

# top_k up to TOP_K_CAP, and a nucleus (top-p without top-k) that lies within the top
# TOP_K_CAP tokens, are served by a partial sort (lax.top_k; SMALL_TOP_K_CAP for small k);
# anything wider falls back to a full sort of the vocabulary (exact, slower).
TOP_K_CAP = 256
SMALL_TOP_K_CAP = 32


def _masked_log_softmax(logits: jax.Array, keep: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)


def _nucleus_keep(sorted_logprobs: jax.Array, top_p: jax.Array) -> jax.Array:
  """For log-probs sorted descending: keep while the mass before a token is < top_p."""
  mass_before = jnp.cumsum(jnp.exp(sorted_logprobs), axis=-1) - jnp.exp(sorted_logprobs)
  keep = mass_before < top_p
  return keep.at[..., 0].set(True)  # the most likely token always survives


_BLOCK = 1024


def draw(u: jax.Array, logits: jax.Array, scale: jax.Array | float = 1.0
         ) -> tuple[jax.Array, jax.Array]:
  """One index per row with probability proportional to `exp(scale * logits)` `[B, V]`.

  Inverse CDF with one uniform `u` `[B]` in [0, 1) per row, where Gumbel-max
  (`jax.random.categorical`) needs V of them: at Qwen3's V = 151,936 that is most of a CPU
  decode step. The logits need not be normalised (`-inf` entries are never chosen). The
  CDF is summed in two levels (blocks of 1024, then within the chosen block) so float32
  rounding stays near 1e-7 however large V is; only the chosen block is exponentiated a
  second time.

  Returns `(index [B], logprob [B])`, the log-probability of the chosen index under the
  normalised distribution. `scale` (> 0; 1 / temperature) is applied inside the passes
  over the logits rather than to a scaled copy of them.
  """
  b, v = logits.shape
  size = min(_BLOCK, v)
  blocks = -(-v // size)
  top = jnp.max(logits, axis=-1, keepdims=True)  # the same argmax for any scale > 0
  shifted = (logits - top) * scale
  padded = jnp.pad(shifted, ((0, 0), (0, blocks * size - v)), constant_values=-jnp.inf)
  block_mass = jnp.sum(jnp.exp(padded).reshape(b, blocks, size), -1)  # [B, blocks]
  block_cdf = jnp.cumsum(block_mass, -1)
  total = block_cdf[:, -1]
  target = (1.0 - u) * total  # in (0, total]: a zero-mass first entry is never forced
  block = jnp.minimum(jnp.sum(block_cdf < target[:, None], -1), blocks - 1)
  before = jnp.take_along_axis(block_cdf - block_mass, block[:, None], -1)[:, 0]
  # The chosen block's window, shifted left when it is the last, partial block; entries
  # of the window that belong to the block before are masked out.
  start = jnp.minimum(block * size, v - size)
  window = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size))(
      logits, start)
  window = (window - top) * scale
  offsets = start[:, None] + jnp.arange(size)
  inner = jnp.where(offsets >= block[:, None] * size, jnp.exp(window), 0.0)
  inner_cdf = jnp.cumsum(inner, -1)
  # Entries past the last nonzero one are never chosen (rounding guard).
  last = size - 1 - jnp.argmax((inner > 0)[:, ::-1], -1)
  pos = jnp.minimum(jnp.sum(inner_cdf < (target - before)[:, None], -1), last)
  chosen = jnp.take_along_axis(window, pos[:, None], -1)[:, 0]
  return start + pos, chosen - jnp.log(total)


def _first_argmax(logits: jax.Array, top: jax.Array, block: int = 128) -> jax.Array:
  """`argmax(logits, -1)` given the row maxima `top` `[B]`: the first index holding it.

  In two levels (the first block whose maximum is `top`, then within it): XLA:CPU's
  argmax reduces (value, index) pairs several times slower than a plain max, which at
  V = 151,936 costs milliseconds per decode step.
  """
  b, v = logits.shape
  block = min(block, v)
  blocks = -(-v // block)
  padded = jnp.pad(logits, ((0, 0), (0, blocks * block - v)), constant_values=-jnp.inf)
  block_max = jnp.max(padded.reshape(b, blocks, block), -1)
  first = jnp.min(jnp.where(block_max == top[:, None], jnp.arange(blocks), blocks - 1), -1)
  # The last block's window is shifted left to stay inside the row; the entries it
  # shares with the block before are below `top` or the earlier block would have won.
  start = jnp.minimum(first * block, v - block)
  window = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, block))(logits, start)
  return start + jnp.argmax(window, -1)


def _sample_candidates(u, cand_logits, cand_ids, top_k, top_p, base_logprobs=None):
  """Top-k then top-p over candidates sorted descending; returns (token, logprob).

  `base_logprobs`: the candidates' log-probabilities under the whole (temperature-scaled)
  distribution, for top-p without top-k; None renormalises over the top-k first.
  """
  rank = jnp.arange(cand_logits.shape[-1])
  keep_k = jnp.where(top_k > 0, rank[None, :] < top_k, True)
  if base_logprobs is None:
    base_logprobs = _masked_log_softmax(cand_logits, keep_k)
  keep = keep_k & _nucleus_keep(base_logprobs, top_p)
  choice, logprob = draw(u, jnp.where(keep, cand_logits, -jnp.inf))
  return jnp.take_along_axis(cand_ids, choice[:, None], axis=-1)[:, 0], logprob


def sample_next(u: jax.Array, logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row from `logits` `[B, V]` (float32), given uniforms `u` `[B]`.

  Returns `(tokens [B], logprobs [B])`. All settings are traced scalars; which branch runs
  is decided at run time, so no setting recompiles. Each branch reads the `[B, V]` logits
  as few times as it can: a decode step at Qwen3's vocabulary is short enough that extra
  passes over 151,936 floats per row show in its time.
  """
  vocab = logits.shape[-1]
  scale = 1.0 / jnp.where(temperature > 0, temperature, 1.0)
  # Scaling by 1 / temperature > 0 keeps the order, so maxima and top-k run on the raw
  # logits and the scale is applied to what they return.

  def greedy(_):
    top = jnp.max(logits, axis=-1)
    return _first_argmax(logits, top), -jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), -1))

  def full_vocab(_):  # temperature only: no sort needed
    return draw(u, logits, scale)

  def full_sort(_):  # top-p over more than `TOP_K_CAP` tokens, or top-k above it
    order = jnp.argsort(-logits, axis=-1)
    values = jnp.take_along_axis(logits, order, axis=-1) * scale
    return _sample_candidates(u, values, order, top_k, top_p)

  def partial_sort(cap):  # 0 < top_k <= cap, or (cap = TOP_K_CAP) a narrow nucleus
    def run(_):
      values, ids = jax.lax.top_k(logits, cap)
      values = values * scale

      def nucleus_only(_):
        # The nucleus is over the whole vocabulary. It lies within the top `cap` tokens
        # exactly when their mass reaches top_p (every later token has at least that much
        # before it); otherwise sort everything.
        top = values[:, :1]
        lse = top[:, 0] + jnp.log(jnp.sum(jnp.exp(logits * scale - top), axis=-1))
        base = values - lse[:, None]
        fits = jnp.all(jnp.sum(jnp.exp(base), axis=-1) >= top_p)
        return jax.lax.cond(
            fits, lambda _: _sample_candidates(u, values, ids, top_k, top_p, base),
            full_sort, None)

      return jax.lax.cond(
          top_k > 0, lambda _: _sample_candidates(u, values, ids, top_k, top_p),
          nucleus_only, None)
    return run

  # A small cap serves the common small top-k (the paper evaluates with 20): lax.top_k
  # at k = 32 costs about half of k = 256 over Qwen3's vocabulary on CPU.
  small, cap = min(SMALL_TOP_K_CAP, vocab), min(TOP_K_CAP, vocab)
  no_top_k = (top_k <= 0) | (top_k >= vocab)
  top_k = jnp.where(no_top_k, 0, top_k)
  branch = jnp.select(
      [temperature <= 0, no_top_k & (top_p >= 1.0), ~no_top_k & (top_k <= small),
       top_k <= cap],
      [0, 1, 2, 3], 4)
  token, logprob = jax.lax.switch(
      branch, (greedy, full_vocab, partial_sort(small), partial_sort(cap), full_sort), None)
  return token.astype(jnp.int32), logprob
