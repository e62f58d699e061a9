"""Tiny random transformers Qwen3 models: the independent reference for our port."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def make_hf_model(*, vocab=128, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2,
                  head_dim=16, tied=False, theta=1e6, seed=0, eps=1e-6
                  ) -> transformers.Qwen3ForCausalLM:
  """A float32 transformers Qwen3 with random weights and randomised norm scales.

  Norm scales are drawn away from 1 so that a port that skipped or misplaced a norm
  (q/k norm before RoPE, for one) could not match by accident.
  """
  config = transformers.Qwen3Config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
      head_dim=head_dim, tie_word_embeddings=tied, rms_norm_eps=eps,
      rope_parameters={"rope_type": "default", "rope_theta": theta},
      max_position_embeddings=4096)
  torch.manual_seed(seed)
  model = transformers.Qwen3ForCausalLM(config).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
      else:  # larger than the 0.02 default, so logits are far from uniform
        p.copy_(0.08 * torch.randn(p.shape, generator=gen))
  return model


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Reference logits with the positions our model derives from the mask."""
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def padded_batch(lengths, vocab, *, side: str, seed=0, pad_id=0):
  """Random token rows of the given lengths, padded on `side` to the longest."""
  rng = np.random.default_rng(seed)
  t = max(lengths)
  ids = np.full((len(lengths), t), pad_id, np.int64)
  mask = np.zeros((len(lengths), t), np.int64)
  for row, n in enumerate(lengths):
    cols = slice(t - n, t) if side == "left" else slice(0, n)
    ids[row, cols] = rng.integers(1, vocab, n)
    mask[row, cols] = 1
  return ids, mask
