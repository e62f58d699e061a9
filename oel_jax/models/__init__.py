"""Qwen3 in Flax NNX and its Hugging Face checkpoint mapping."""

from oel_jax.models.hf import CheckpointError, check_hf, load_hf, save_hf
from oel_jax.models.qwen3 import (
    PRESETS,
    KVCache,
    Qwen3,
    Qwen3Config,
    abstract_model,
    init_model,
    positions_from_mask,
)

__all__ = [
    "PRESETS", "CheckpointError", "KVCache", "Qwen3", "Qwen3Config", "abstract_model",
    "check_hf", "init_model", "load_hf", "positions_from_mask", "save_hf",
]
