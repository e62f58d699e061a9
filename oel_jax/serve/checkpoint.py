"""Loading a checkpoint to serve: its tokenizer, its model, and a sampler for it.

A hot swap (`/admin/reload`) loads the new checkpoint with the served one's dtypes, checks that
its tokenizer is the served one (the replies in flight and the prompts already rendered are in
the served tokenizer's ids), and keeps the sampler (its compiled programs) when the
architecture is the same: only the weights change.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from oel_jax import chat
from oel_jax.errors import InputError
from oel_jax.models import load_hf
from oel_jax.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class LoadOptions:
  """How checkpoints are loaded and sampled."""

  param_dtype: str = "float32"
  """Weights dtype (``float32``, ``bfloat16``)."""
  compute_dtype: str = "bfloat16"
  """Activations and matmul dtype."""
  max_seq_len: int = 8192
  """Longest prompt + reply a request may have."""
  min_prompt_bucket: int = 32
  """Smallest padded prompt length (prompts pad to powers of two from here)."""
  mesh: Any = None
  """A `jax.sharding.Mesh` (axes data, fsdp, tp) the weights are split over and the requests
  decoded on, every reloaded checkpoint too; None: one device."""


def load_tokenizer(path: str) -> Any:
  """The checkpoint's own tokenizer (it must have a chat template).

  Raises:
    InputError: there is none, or it cannot be loaded; naming the directory.
  """
  if not os.path.isdir(path):
    raise InputError(f"{path}: not a checkpoint directory")
  try:
    tokenizer = chat.load_tokenizer(path)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: cannot load the checkpoint's tokenizer: {chat_error(e)}") from None
  if not getattr(tokenizer, "chat_template", None):
    raise InputError(f"{path}: the tokenizer has no chat template (tokenizer_config.json "
                     "'chat_template' or chat_template.jinja)")
  return tokenizer


def chat_error(error: BaseException) -> str:
  """The first line of an error's message."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def tokenizer_difference(served: Any, new: Any) -> str | None:
  """What differs between two tokenizers (vocabulary, special tokens, chat template), or
  None when they encode and render alike."""
  if served.get_vocab() != new.get_vocab():
    return "the vocabulary differs"
  for name in ("eos_token", "pad_token", "bos_token"):
    if getattr(served, name, None) != getattr(new, name, None):
      return f"{name} differs ({getattr(served, name, None)!r} vs {getattr(new, name, None)!r})"
  if served.chat_template != new.chat_template:
    return "the chat template differs"
  return None


def load_model(path: str, options: LoadOptions) -> Any:
  """The checkpoint's `Qwen3` model in the options' dtypes.

  Raises:
    InputError: not a directory or not a loadable Qwen3 checkpoint (the message says why).
  """
  if not os.path.isdir(path):
    raise InputError(f"{path}: not a checkpoint directory")
  try:
    return load_hf(path, dtype=getattr(jnp, options.param_dtype),
                   compute_dtype=getattr(jnp, options.compute_dtype), mesh=options.mesh)
  except InputError:
    raise
  except (OSError, ValueError) as e:  # a missing config.json, a config that is not Qwen3's
    raise InputError(f"{path}: not a loadable Qwen3 checkpoint: {chat_error(e)}") from None


def make_sampler(model: Any, tokenizer: Any, options: LoadOptions) -> Sampler:
  """A sampler for ``model`` (on the options' mesh, if any) that stops at the tokenizer's
  turn-end tokens."""
  stops = chat.stop_token_ids(tokenizer)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
  return Sampler(model, eos_ids=stops, pad_id=pad, max_seq_len=options.max_seq_len,
                 min_prompt_bucket=options.min_prompt_bucket, mesh=options.mesh)
