"""Blockwise causal attention against plain softmax attention, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oel_jax.models import Qwen3Config, init_model
from oel_jax.models.attention import blockwise_causal_attention


def _plain(q, k, v, key_mask):
  """softmax(q k^T / sqrt(D)) v over keys s <= t with key_mask, written out directly."""
  t, d = q.shape[1], q.shape[-1]
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k) / np.sqrt(d)
  visible = np.tril(np.ones((t, t), bool))[None] & (key_mask[:, None, :] > 0)
  scores = jnp.where(visible[:, None, None], scores, -1e30)
  return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(scores, -1), v)


def _inputs(t, *, pad, seed=0, b=2, kh=2, g=3, d=8):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, kh, g, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, kh, t, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, kh, t, d)), jnp.float32)
  mask = np.ones((b, t), np.int32)
  if pad == "right":
    mask[0, t - 3:] = 0
  elif pad == "left":
    mask[1, :4] = 0
  return q, k, v, jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _values_and_grads(q, k, v, mask, real, t, block_q, block_k):
  """Both attentions and their gradients, with a cotangent on real query rows only (padding
  rows feed nothing). One program per shape: op by op, the two backward passes cost several
  times more in per-op compiles."""
  out = blockwise_causal_attention(q, k, v, mask, block_q=block_q, block_k=block_k)
  ct = jax.random.normal(jax.random.key(t), out.shape) * real[:, None, None, :, None]
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * ct)
  grads = jax.grad(loss(lambda q, k, v: blockwise_causal_attention(
      q, k, v, mask, block_q=block_q, block_k=block_k)), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(loss(lambda q, k, v: _plain(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
  return out, _plain(q, k, v, mask), grads, ref_grads


# Lengths that divide the blocks and lengths that do not; blocks larger than the sequence.
@pytest.mark.parametrize("t,block_q,block_k", [(16, 4, 4), (13, 4, 4), (13, 8, 3), (11, 3, 5),
                                               (7, 16, 16)])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_blockwise_equals_plain_attention(t, block_q, block_k, pad):
  q, k, v, mask = _inputs(t, pad=pad, seed=t)
  real = np.asarray(mask, bool)  # queries that see at least one key (left padding: not all)
  real &= np.cumsum(np.asarray(mask), 1) > 0
  out, ref, grads, ref_grads = _values_and_grads(q, k, v, mask, jnp.asarray(real), t,
                                                 block_q, block_k)
  assert np.isfinite(np.asarray(out)).all()
  sel = lambda x: np.asarray(x).transpose(0, 3, 1, 2, 4)[real]
  np.testing.assert_allclose(sel(out), sel(ref), atol=2e-6, rtol=1e-5)
  for name, a, b in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4,
                               err_msg=f"d{name}")


def test_blockwise_attention_in_bf16_close_to_float32():
  q, k, v, mask = _inputs(37, pad="right", seed=5)
  ref = _plain(q, k, v, mask)
  bf = lambda x: x.astype(jnp.bfloat16)
  out = blockwise_causal_attention(bf(q), bf(k), bf(v), mask, block_q=8, block_k=16)
  assert out.dtype == jnp.bfloat16
  real = np.asarray(mask, bool)
  sel = lambda x: np.asarray(x, np.float32).transpose(0, 3, 1, 2, 4)[real]
  np.testing.assert_allclose(sel(out), sel(ref), atol=3e-2)


@pytest.mark.parametrize("t,prefix,block_q,block_k", [(9, 7, 4, 4), (5, 16, 8, 3),
                                                      (12, 3, 16, 16)])
def test_blockwise_attention_after_a_key_prefix_equals_plain(t, prefix, block_q, block_k):
  """T queries after `prefix` extra keys (a cached prefix): query t sees every unmasked
  prefix key and its own keys up to t."""
  rng = np.random.default_rng(t + prefix)
  b, kh, g, d, s = 2, 2, 3, 8, t + prefix
  q = jnp.asarray(rng.normal(size=(b, t, kh, g, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, kh, s, d)), jnp.float32) for _ in range(2))
  mask = np.ones((b, s), np.int32)
  mask[0, prefix - 2:prefix] = 0  # row 0 uses fewer cached slots
  mask[1, s - 2:] = 0  # row 1's own keys are right-padded
  mask = jnp.asarray(mask)
  visible = (np.arange(s)[None, :] <= prefix + np.arange(t)[:, None])[None] & (
      np.asarray(mask)[:, None, :] > 0)

  def plain(q, k, v):
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k) / np.sqrt(d)
    scores = jnp.where(visible[:, None, None], scores, -1e30)
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(scores, -1), v)

  blockwise = lambda q, k, v: blockwise_causal_attention(q, k, v, mask, block_q=block_q,
                                                         block_k=block_k)
  ct = jnp.asarray(rng.normal(size=(b, kh, g, t, d)), jnp.float32)
  values, grads = [], []
  for f in (blockwise, plain):
    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    values.append(np.asarray(out))
    grads.append(vjp(ct))
  np.testing.assert_allclose(values[0], values[1], atol=2e-6, rtol=1e-5)
  for name, a, b_ in zip("qkv", *grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=2e-5, rtol=1e-4,
                               err_msg=f"d{name}")


def test_blockwise_attention_rejects_mismatched_shapes():
  q, k, v, mask = _inputs(8, pad="none")
  with pytest.raises(ValueError, match="disagree"):
    blockwise_causal_attention(q, k[:, :, :5], v[:, :, :5], mask)
  with pytest.raises(ValueError, match="disagree"):  # fewer keys than queries
    blockwise_causal_attention(q, k[:, :, :5], v[:, :, :5], mask[:, :5])
  with pytest.raises(ValueError, match="block sizes"):
    blockwise_causal_attention(q, k, v, mask, block_q=0)


CONFIG = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("remat", [False, True])
def test_model_with_blockwise_attention_matches_plain(remat):
  """Logits and parameter gradients of the whole model, right- and left-padded rows."""
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 19)), jnp.int32)
  mask = np.ones((2, 19), np.int32)
  mask[0, 15:] = 0
  mask[1, :5] = 0
  mask = jnp.asarray(mask)
  real = np.asarray(mask, bool)

  def run(block):
    model = init_model(CONFIG.replace(attention_block_size=block, remat=remat), seed=3)
    nnx.update(model, jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, nnx.state(model)))

    def loss(model):
      logits = model(ids, attention_mask=mask)
      return jnp.sum(jnp.where(real[..., None], logits, 0.0) ** 2) / 100, logits

    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return np.asarray(logits)[real], grads

  (plain, g_plain), (blocked, g_blocked) = run(0), run(4)
  scale = np.abs(plain).max()
  np.testing.assert_allclose(blocked, plain, atol=1e-5 * scale, rtol=0)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g_plain), nnx.to_flat_state(g_blocked)):
    a, b = np.asarray(a[...]), np.asarray(b[...])
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max(), rtol=0, err_msg=str(path))
