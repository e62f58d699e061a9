"""Tests for oel_jax.sft: the cross-entropy step, against transformers' own causal-LM loss."""

import numpy as np
import optax
import pytest
import torch

from hf_reference import make_hf_model
from oel_jax.models import load_hf
from oel_jax.sft import SFTStep, make_sft_batch, sft_loss

PAD = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  hf = make_hf_model(vocab=96, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2,
                     head_dim=8, seed=3)
  path = tmp_path_factory.mktemp("sft_model")
  hf.save_pretrained(path)
  return hf, load_hf(path)


def _pairs(seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(7, 3), (12, 5), (4, 1), (9, 9)]
  return ([list(rng.integers(1, 96, p)) for p, _ in shapes],
          [list(rng.integers(1, 96, r)) for _, r in shapes])


def test_loss_is_transformers_causal_lm_loss_on_the_reply_tokens(models):
  hf, ours = models
  prompts, replies = _pairs()
  batch = make_sft_batch(prompts, replies, pad_id=PAD, length=20)
  total, count = sft_loss(ours, batch)
  # transformers: labels -100 outside the replies; the model shifts them itself.
  ids = np.asarray(batch.tokens, np.int64)
  labels = np.where(np.asarray(batch.loss_mask) > 0, ids, -100)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(
        np.asarray(batch.attention_mask, np.int64)), labels=torch.tensor(labels))
  assert int(count) == sum(len(r) for r in replies)
  np.testing.assert_allclose(float(total / count), float(out.loss), rtol=1e-5)


def test_batch_layout_and_errors():
  batch = make_sft_batch([[5, 6], [7]], [[8], [9, 10]], pad_id=PAD, length=4)
  np.testing.assert_array_equal(batch.tokens, [[5, 6, 8, 0], [7, 9, 10, 0]])
  np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 1, 0], [0, 1, 1, 0]])
  with pytest.raises(ValueError, match="pair 0: 2 prompt \\+ 3 reply tokens exceed"):
    make_sft_batch([[1, 2]], [[3, 4, 5]], pad_id=PAD, length=4)
  with pytest.raises(ValueError, match="pair 1: the reply is empty"):
    make_sft_batch([[1], [2]], [[3], []], pad_id=PAD, length=4)
  with pytest.raises(ValueError, match="pair 0: the prompt is empty"):
    make_sft_batch([[]], [[3]], pad_id=PAD, length=4)
  with pytest.raises(ValueError, match="2 prompts but 1 replies"):
    make_sft_batch([[1], [2]], [[3]], pad_id=PAD, length=4)


def test_step_is_adam_on_the_reference_gradient_and_learns(models):
  hf, ours = models
  prompts, replies = _pairs(1)
  batch = make_sft_batch(prompts, replies, pad_id=PAD, length=20)
  step = SFTStep(ours, optax.sgd(0.5))
  state = step.init_state(ours)
  # One SGD step moves the embedding by -lr * the reference gradient.
  ids = np.asarray(batch.tokens, np.int64)
  labels = np.where(np.asarray(batch.loss_mask) > 0, ids, -100)
  hf.zero_grad()
  hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(
      np.asarray(batch.attention_mask, np.int64)), labels=torch.tensor(labels)).loss.backward()
  reference = hf.model.embed_tokens.weight.grad.numpy()
  embed_before = np.asarray(ours.embed[...])
  state, metrics = step(state, batch)
  moved = (embed_before - np.asarray(step.model(state).embed[...])) / 0.5
  np.testing.assert_allclose(moved, reference, atol=2e-6, rtol=1e-4)
  assert int(state.step) == 1 and metrics["tokens"] == sum(len(r) for r in replies)
  # Per-row sums (for a loss per kind of example) add up to the batch's token mean.
  np.testing.assert_array_equal(metrics["row_tokens"], [len(r) for r in replies])
  np.testing.assert_allclose(float(metrics["row_nll"].sum() / metrics["tokens"]),
                             float(metrics["loss"]), rtol=1e-6)
  # And Adam drives the loss down on a batch it sees repeatedly.
  step = SFTStep(ours, optax.adam(1e-2))
  state = step.init_state(ours)
  first = None
  for _ in range(30):
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics["loss"])
  assert float(metrics["loss"]) < 0.2 * first
  # The model the step started from is untouched (the state holds copies).
  np.testing.assert_array_equal(np.asarray(ours.embed[...]), embed_before)
