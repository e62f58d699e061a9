"""The built-in tiny tokenizer: a small Qwen3-style tokenizer shipped with the package.

The tiny default (CPU runs, tests, Colab demos) needs a tokenizer that behaves like Qwen3's
without a download: byte-level BPE, Qwen3's special tokens, and a Qwen3-style chat template
with thinking on/off. ``scripts/build_tiny_tokenizer.py`` trains it deterministically on text
the script holds and writes it to ``oel_jax/assets/tiny_tokenizer/``; the generated files are
committed, and a test checks that re-running the script reproduces them.

Token ids. The byte-level BPE vocabulary takes ids ``0 .. BPE_VOCAB_SIZE - 1`` (the 256 byte
symbols first, then the learned merges). The added tokens follow it, in Qwen3's order, as in
Qwen3 (where they start at 151643):

  ==================  =====  ==============  =============  ========================
  token               id     Qwen3 id        special        role
  ==================  =====  ==============  =============  ========================
  ``<|endoftext|>``   2000   151643          yes            pad; base models' eos
  ``<|im_start|>``    2001   151644          yes            opens a chat turn
  ``<|im_end|>``      2002   151645          yes            ends a chat turn; eos
  ``<think>``         2003   151667          no (added)     opens reasoning
  ``</think>``        2004   151668          no (added)     closes reasoning
  ==================  =====  ==============  =============  ========================

As in Qwen3's post-trained checkpoints, ``eos_token`` is ``<|im_end|>``, ``pad_token`` is
``<|endoftext|>`` and there is no bos or unk token; generation stops on either of the two
(Qwen3's ``generation_config.json`` lists ``eos_token_id: [151645, 151643]``). ``<think>`` and
``</think>`` are regular added tokens, not special ones, so ``decode(...,
skip_special_tokens=True)`` keeps them, exactly like Qwen3.

Vocabulary size. ``len(tokenizer) == TOKENIZER_LEN`` (2005). A model's embedding must have at
least that many rows; ``PADDED_VOCAB_SIZE`` (2048) is the suggested model vocab size, the
tokenizer length rounded up to a multiple of 128, the way Qwen3 pads 151,669 tokens to 151,936
rows. Ids ``TOKENIZER_LEN .. PADDED_VOCAB_SIZE - 1`` are never produced by the tokenizer.
"""

import importlib.resources
import os

from oel_jax import chat
from oel_jax.models import Qwen3Config, init_model, save_hf

# Byte-level BPE ids (256 byte symbols + learned merges).
BPE_VOCAB_SIZE = 2000

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = chat.THINK_START
THINK_END = chat.THINK_END

ENDOFTEXT_ID = BPE_VOCAB_SIZE
IM_START_ID = BPE_VOCAB_SIZE + 1
IM_END_ID = BPE_VOCAB_SIZE + 2
THINK_START_ID = BPE_VOCAB_SIZE + 3
THINK_END_ID = BPE_VOCAB_SIZE + 4

# (token, id, special) in id order; the builder adds them in exactly this order.
ADDED_TOKENS = (
    (ENDOFTEXT, ENDOFTEXT_ID, True),
    (IM_START, IM_START_ID, True),
    (IM_END, IM_END_ID, True),
    (THINK_START, THINK_START_ID, False),
    (THINK_END, THINK_END_ID, False),
)

# len(tokenizer): every id the tokenizer can produce is below this.
TOKENIZER_LEN = BPE_VOCAB_SIZE + len(ADDED_TOKENS)
# Suggested embedding rows for a tiny model: TOKENIZER_LEN rounded up to a multiple of 128.
PADDED_VOCAB_SIZE = -(-TOKENIZER_LEN // 128) * 128

EOS_TOKEN = IM_END
PAD_TOKEN = ENDOFTEXT
EOS_ID = IM_END_ID
PAD_ID = ENDOFTEXT_ID
# The ids that end a turn, as Qwen3's generation_config lists them (im_end first).
STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)


def tiny_tokenizer_path() -> str:
  """Returns the directory of the packaged tiny tokenizer (a HF tokenizer directory).

  Raises:
    FileNotFoundError: the package was installed without its assets, or from a zip.
  """
  path = os.fspath(importlib.resources.files("oel_jax") / "assets" / "tiny_tokenizer")
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(
        f"tiny tokenizer not found at {path} (tokenizer.json missing): the package data "
        "`oel_jax/assets/tiny_tokenizer/` was not installed; reinstall the package, or "
        "regenerate it with `python scripts/build_tiny_tokenizer.py`")
  return path


def load_tiny_tokenizer():
  """Loads the packaged tiny tokenizer with transformers' ``AutoTokenizer`` (offline).

  Returns:
    A transformers tokenizer whose ``len()`` is ``TOKENIZER_LEN``, with the chat template
    described in ``scripts/build_tiny_tokenizer.py``.
  """
  return chat.load_tokenizer(tiny_tokenizer_path())


# The tiny model: Qwen3's architecture at a size that runs the whole method on a CPU in
# minutes. GQA ratio 2 and a decoupled head_dim, like the real checkpoints.
TINY_SHAPE = dict(
    vocab_size=PADDED_VOCAB_SIZE, hidden_size=256, intermediate_size=768, num_layers=4,
    num_heads=8, num_kv_heads=4, head_dim=32, rope_theta=1_000_000.0,
    tie_word_embeddings=True, max_position_embeddings=32_768)
TINY_SEED = 0


def tiny_config(**overrides):
  """The tiny model's `Qwen3Config` (dtype fields and shape overridable)."""
  return Qwen3Config(**{**TINY_SHAPE, **overrides})


def tiny_model(seed: int = TINY_SEED, **overrides):
  """The tiny model with random weights from a fixed seed (no download)."""
  return init_model(tiny_config(**overrides), seed=seed)


def write_tiny_checkpoint(path: str | os.PathLike, seed: int = TINY_SEED) -> str:
  """Writes the tiny model and tokenizer as a Hugging Face checkpoint directory.

  Every stage that takes a checkpoint path (load_hf, transformers, vLLM) can then be run
  on the tiny default exactly as on a real Qwen3 checkpoint.
  """
  save_hf(tiny_model(seed), path, tokenizer=load_tiny_tokenizer())
  return os.fspath(path)
