"""Supervised fine-tuning: the cross-entropy step that trains a model on (prompt, reply) pairs.

Used to train the learning demo's model from scratch (``scripts/build_demo_model.py``); a
library piece for anyone who needs a Qwen3 trained on text before OEL starts. The loss is
the token-mean negative log-likelihood of the reply tokens (prompt tokens are context only),
over the whole batch, in float32 from the model's float32 logits.

    batch = make_sft_batch(prompt_ids, reply_ids, pad_id=tok.pad_token_id, length=1024)
    step = SFTStep(model, optax.adamw(3e-4))
    state = step.init_state(model)
    state, metrics = step(state, batch)       # loss, tokens, grad_norm, row_nll, row_tokens
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from oel_jax.models.qwen3 import Qwen3
from oel_jax.train import TrainState


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SFTBatch:
  """Right-padded sequences of prompt + reply with the reply tokens marked."""

  tokens: jax.Array
  """`[B, T]` int32: prompt ids, then reply ids, then padding."""
  attention_mask: jax.Array
  """`[B, T]` int32: 1 on prompt and reply tokens, 0 on padding."""
  loss_mask: jax.Array
  """`[B, T]` float32: 1 on reply tokens (the tokens predicted and scored), else 0."""


def make_sft_batch(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], *,
                   pad_id: int, length: int) -> SFTBatch:
  """Packs prompt + reply pairs into one right-padded batch of ``length`` tokens.

  Raises:
    ValueError: a pair is longer than ``length``, a reply is empty, or the counts differ.
  """
  if len(prompts) != len(replies):
    raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
  b = len(prompts)
  tokens = np.full((b, length), pad_id, np.int32)
  attention = np.zeros((b, length), np.int32)
  scored = np.zeros((b, length), np.float32)
  for i, (p, r) in enumerate(zip(prompts, replies)):
    n = len(p) + len(r)
    if not r:
      raise ValueError(f"pair {i}: the reply is empty (nothing to train on)")
    if not p:
      raise ValueError(f"pair {i}: the prompt is empty (the first reply token has no context)")
    if n > length:
      raise ValueError(f"pair {i}: {len(p)} prompt + {len(r)} reply tokens exceed the batch "
                       f"length {length}")
    tokens[i, :n] = np.concatenate([np.asarray(p, np.int32), np.asarray(r, np.int32)])
    attention[i, :n] = 1
    scored[i, len(p):n] = 1.0
  return SFTBatch(jnp.asarray(tokens), jnp.asarray(attention), jnp.asarray(scored))


def row_losses(model: Qwen3, batch: SFTBatch) -> tuple[jax.Array, jax.Array]:
  """Per row: (sum of the reply tokens' negative log-likelihoods `[B]`, reply tokens `[B]`)."""
  logits = model(batch.tokens, attention_mask=batch.attention_mask)  # [B, T, V] float32
  # The logits at t predict token t + 1.
  log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  targets = batch.tokens[:, 1:]
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  weights = batch.loss_mask[:, 1:]
  return jnp.sum(nll * weights, axis=1), jnp.sum(weights, axis=1)


def sft_loss(model: Qwen3, batch: SFTBatch) -> tuple[jax.Array, jax.Array]:
  """(sum of the reply tokens' negative log-likelihoods, number of reply tokens)."""
  nll, count = row_losses(model, batch)
  return jnp.sum(nll), jnp.sum(count)


class SFTStep:
  """A jitted cross-entropy step for one model architecture and optimizer.

  Args:
    model: the model to train (its graph is reused; its weights seed `init_state`).
    tx: the optax optimizer (schedules, clipping and weight decay included).
  """

  def __init__(self, model: Qwen3, tx: optax.GradientTransformation):
    self.graphdef, _ = nnx.split(model)
    self.tx = tx
    self._step = jax.jit(self._update, donate_argnums=0)

  def init_state(self, model: Qwen3) -> TrainState:
    """A fresh train state from the model's weights (copied: the step donates them)."""
    params = jax.tree.map(jnp.copy, nnx.state(model))
    return TrainState(params=params, opt_state=self.tx.init(params),
                      step=jnp.zeros((), jnp.int32))

  def model(self, state: TrainState) -> Qwen3:
    """The model at ``state`` (shares its arrays)."""
    return nnx.merge(self.graphdef, state.params)

  def _update(self, state: TrainState, batch: SFTBatch) -> tuple[TrainState, dict[str, Any]]:
    def loss_fn(params):
      nll, count = row_losses(nnx.merge(self.graphdef, params), batch)
      return jnp.sum(nll) / jnp.maximum(jnp.sum(count), 1.0), (nll, count)

    (loss, (nll, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "tokens": jnp.sum(count), "grad_norm": optax.global_norm(grads),
               "row_nll": nll, "row_tokens": count}
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

  def __call__(self, state: TrainState, batch: SFTBatch) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step on ``batch``; returns the new state and the step's metrics."""
    return self._step(state, batch)
