"""The tiny default model: its config matches its tokenizer and it round-trips through HF."""

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from oel_jax import chat, tiny
from oel_jax.models import load_hf


def test_tiny_checkpoint_loads_in_transformers_with_same_logits(tmp_path):
  path = tiny.write_tiny_checkpoint(tmp_path)
  ours = tiny.tiny_model()
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  assert len(tokenizer) <= ours.config.vocab_size
  ids = chat.encode_chat(tokenizer, [{"role": "user", "content": "Move [up] or [left]?"}],
                         enable_thinking=False)
  hf = transformers.Qwen3ForCausalLM.from_pretrained(path).eval()
  with torch.no_grad():
    ref = hf(torch.tensor([ids])).logits.numpy()
  got = np.asarray(ours(jnp.asarray([ids])))
  np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
  reloaded = load_hf(path)
  np.testing.assert_array_equal(np.asarray(reloaded.embed[...]), np.asarray(ours.embed[...]))


def test_tiny_model_is_deterministic():
  a, b = tiny.tiny_model(), tiny.tiny_model()
  np.testing.assert_array_equal(np.asarray(a.layers[0].mlp.up_proj[...]),
                                np.asarray(b.layers[0].mlp.up_proj[...]))
  c = tiny.tiny_model(seed=1)
  assert not np.array_equal(np.asarray(a.embed[...]), np.asarray(c.embed[...]))
