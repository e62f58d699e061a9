"""Where the demo's packaged files are."""

import importlib.resources
import os


def demo_model_path() -> str:
  """The packaged demo model's directory (a Hugging Face Qwen3 checkpoint, tokenizer included).

  Not checked here: the loop reads every header before it starts and names what is missing;
  ``python scripts/build_demo_model.py`` rebuilds the files.
  """
  return os.fspath(importlib.resources.files("oel_jax") / "assets" / "demo_model")


def demo_config_path() -> str:
  """The packaged demo config file (an ml_collections config file with ``get_config``)."""
  return os.fspath(importlib.resources.files("oel_jax") / "demo" / "config.py")
