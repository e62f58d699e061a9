"""The frozen teacher's knowledge prefixes: read once per round, attended to at every step.

A consolidation round has a frozen teacher and K knowledge texts, and every teacher prompt is
one of those texts inside the same prompt format, so all the prompts drawing text k start with
the same tokens (the chat template's opening, the game header, the knowledge block, often the
game rules). Keys and values at a position depend only on the tokens up to it, so the teacher
runs once over each text's shared prefix (`prefill`, keeping every layer's keys and values,
`PrefixKV`), and each step's teacher forward computes only the rest of each row (the
situation and the response) with its attention reading the cached prefix of its row's text
(`hidden_states_with_prefix`). Same hidden states as the whole forward, up to float rounding.

Exactness does not rest on guessing where the shared prefix ends: each row uses the longest
run of the cached tokens its own prompt starts with (`split_prompts`), so a cached prefix that
goes one token past the shared part (a BPE merge across the boundary, a prompt of another
format) only saves less for that row.

Shapes: C context (knowledge) texts, P cached slots, B rows, T tokens a row computes,
L layers, K key/value heads, D head dim, H hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from oel_jax.models.qwen3 import (FSDP, TP, Qwen3, _mesh_has, _stacked_layer_params,
                                  constrain_batch, embed_tokens, positions_from_mask)
from oel_jax.sampling import common_prefix_length


@flax.struct.dataclass
class PrefixKV:
  """Every layer's keys and values over the C cached prefixes (right-padded to P slots)."""

  k: tuple[jax.Array, ...]
  """Per layer, keys `[C, K, P, D]` (RoPE applied at positions 0..P-1), compute dtype."""
  v: tuple[jax.Array, ...]
  """Per layer, values `[C, K, P, D]`."""

  @property
  def slots(self) -> int:
    return self.k[0].shape[2]


@dataclasses.dataclass(frozen=True)
class KnowledgePrefix:
  """The cached prefixes of one round: their token ids (host) and the teacher's keys and
  values over them (device)."""

  ids: tuple[tuple[int, ...], ...]
  """Per context text, the token ids the cache holds (a prefix of the teacher prompts that
  draw that text)."""
  kv: PrefixKV
  """The teacher's keys and values over `ids` (slot j of text c holds token ``ids[c][j]``)."""


def common_prefix(texts: Sequence[str]) -> str:
  """The longest string every text starts with ("" for none)."""
  if not texts:
    return ""
  out = texts[0]
  for t in texts[1:]:
    if t.startswith(out):
      continue
    lo, hi = 0, min(len(out), len(t))  # out[:lo] is shared, out[:hi + 1] is not
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if t.startswith(out[:mid]):
        lo = mid
      else:
        hi = mid - 1
    out = out[:lo]
  return out


def split_prompts(teacher_prompts: Sequence[Sequence[int]], contexts: Sequence[int],
                  prefix_ids: Sequence[Sequence[int]]
                  ) -> tuple[list[list[int]], list[int]]:
  """Each teacher prompt as (cached part, the rest): the rest's tokens and the cached length.

  Row i uses the first ``n_i`` cached tokens of text ``contexts[i]``: as many as its prompt
  starts with, leaving at least the prompt's last token to compute (its hidden state scores
  the first response token).

  Returns:
    ``(rest, n)``: per row, ``teacher_prompts[i][n_i:]`` and ``n_i``.

  Raises:
    ValueError: lengths differ, a prompt is empty, or a context index has no cached prefix.
  """
  if len(teacher_prompts) != len(contexts):
    raise ValueError(f"split_prompts: {len(teacher_prompts)} teacher prompts, "
                     f"{len(contexts)} contexts")
  rest, used = [], []
  for i, (prompt, c) in enumerate(zip(teacher_prompts, contexts)):
    if not 0 <= c < len(prefix_ids):
      raise ValueError(f"split_prompts: row {i} draws context {c}, but prefixes are cached "
                       f"for {len(prefix_ids)} texts")
    if not prompt:
      raise ValueError(f"split_prompts: teacher prompt {i} is empty")
    n = min(common_prefix_length([prompt, prefix_ids[c]]), len(prompt) - 1)
    rest.append(list(prompt[n:]))
    used.append(n)
  return rest, used


def knowledge_prefix_ids(render: Callable[[Any, str], str], encode: Callable[[str], list[int]],
                         prompts: Sequence[Any], knowledge: Sequence[str]
                         ) -> list[list[int]]:
  """Per knowledge text, the token ids every teacher prompt drawing it starts with (about).

  The text every rendered prompt ``render(prompt, text)`` (over all ``prompts``) starts with,
  encoded by ``encode``. Tokenised alone, that text's last token or two may differ from the
  prompts' tokens at the boundary; `split_prompts` matches each row's own tokens, so only
  those tokens go uncached.
  """
  return [encode(common_prefix([render(p, text) for p in prompts])) for text in knowledge]


def _layer_kv(layer, x, positions, attend, prefix: tuple[jax.Array, jax.Array] | None):
  """One decoder layer over x `[B, T, H]` attending (after `prefix`'s keys and values, when
  given) as `attend` says; returns the layer's output and its own keys and values."""
  attn = layer.attn
  q, k, v = attn.project(layer.input_norm(x), positions)
  keys, values = (k, v) if prefix is None else (jnp.concatenate([prefix[0], k], axis=2),
                                                jnp.concatenate([prefix[1], v], axis=2))
  x = x + attn.attend(q, keys, values, attend)
  return x + layer.mlp(layer.post_attn_norm(x)), (k, v)


def _attend(model: Qwen3, key_mask: jax.Array, t: int) -> jax.Array:
  """What `Attention.attend` takes for T = ``t`` queries, the last ``t`` of S keys masked by
  ``key_mask`` `[B, S]`: the key mask itself (blockwise, causal) for long sequences, else the
  `[B, T, S]` visibility (the model's own choice between the two)."""
  s = key_mask.shape[1]
  block = model.config.attention_block_size
  if 0 < block < s:
    return key_mask
  causal = jnp.arange(s)[None, :] <= (s - t) + jnp.arange(t)[:, None]  # [T, S]
  return causal[None] & (key_mask[:, None, :] > 0)


def prefill(model: Qwen3, ids: jax.Array, mask: jax.Array) -> PrefixKV:
  """The model's keys and values over right-padded prefixes ids, mask `[C, P]`."""
  mask = mask.astype(jnp.int32)
  positions = positions_from_mask(mask)
  attend = _attend(model, mask, ids.shape[1])
  x = embed_tokens(model.embed[...], ids).astype(model.config.compute_dtype)
  ks, vs = [], []
  for layer in model.layers:
    x, (k, v) = _layer_kv(layer, x, positions, attend, None)
    x = constrain_batch(x)
    ks.append(k)
    vs.append(v)
  return PrefixKV(k=tuple(ks), v=tuple(vs))


def hidden_states_with_prefix(model: Qwen3, kv: PrefixKV, ids: jax.Array, mask: jax.Array,
                              context: jax.Array, prefix_len: jax.Array) -> jax.Array:
  """Final-norm hidden states `[B, T, H]` of rows that continue cached prefixes.

  Row b is the first ``prefix_len[b]`` tokens of cached text ``context[b]`` followed by its
  right-padded ``ids[b]`` `[B, T]` (``mask`` `[B, T]`); its tokens sit at positions
  ``prefix_len[b]`` onwards and attend to those cached slots and, causally, to each other.
  Equals `Qwen3.hidden_states` of the whole rows at those positions, up to float rounding.
  """
  mask = mask.astype(jnp.int32)
  t = ids.shape[1]
  positions = positions_from_mask(mask, prefix_len[:, None])
  cached = (jnp.arange(kv.slots)[None, :] < prefix_len[:, None]).astype(jnp.int32)  # [B, P]
  attend = _attend(model, jnp.concatenate([cached, mask], axis=1), t)
  x = embed_tokens(model.embed[...], ids).astype(model.config.compute_dtype)

  def layer_step(layer, x, k, v):
    rows = tuple(constrain_batch(jnp.take(a, context, axis=0)) for a in (k, v))
    return constrain_batch(_layer_kv(layer, x, positions, attend, rows)[0])

  if model.config.remat:
    x = _scan_layers_with_prefix(model, kv, x, layer_step)
  else:
    for layer, k, v in zip(model.layers, kv.k, kv.v):
      x = layer_step(layer, x, k, v)
  return model.final_norm(x)


def _scan_layers_with_prefix(model: Qwen3, kv: PrefixKV, x: jax.Array, layer_step) -> jax.Array:
  """``layer_step(layer, x, k, v)`` over every layer as one `lax.scan` over the stacked layer
  weights and caches `[L, C, K, P, D]`.

  Why, with ``remat`` (the big-model setting): unrolled, XLA:CPU's collective combiners join
  all 36 layers' weight and cache gathers into single ops and keep them all live (Qwen3-8B on
  8 devices: 23 GiB more temporaries per device than the step without the cache); a loop body
  holds one layer's, as in `Qwen3.hidden_states` (`qwen3._scan_layers`).
  """
  graphdef = nnx.graphdef(model.layers[0])
  stacked = _stacked_layer_params(model.layers, x.dtype)
  caches = [jnp.stack(a) for a in (kv.k, kv.v)]
  if _mesh_has(FSDP, TP):  # each layer's cache stays split as `Trainer.prefix_sharding` splits it
    caches = [jax.lax.with_sharding_constraint(a, P(None, None, TP, FSDP)) for a in caches]

  def body(x, layer_xs):
    state, k, v = layer_xs
    return layer_step(nnx.merge(graphdef, state), x, k, v), None

  return jax.lax.scan(body, x, (stacked, *caches))[0]
