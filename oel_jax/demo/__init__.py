"""The learning demo: a world where OEL measurably improves a small model on a CPU.

FrozenLake on remapped lakes (`make_env("frozenlake", controls=..., lake=...)`), a small Qwen3
trained from scratch on the synthetic curriculum in `oel_jax.demo.curriculum` by
``scripts/build_demo_model.py``, and ``configs/demo.py``, which runs the ordinary loop with it
in the held-out world (`DEMO_CONTROLS` on lake `DEMO_LAKE`).
"""

import importlib.resources
import os

from oel_jax.demo.curriculum import DEMO_CONTROLS, DEMO_LAKE


def demo_model_path() -> str:
  """The packaged demo model (a Hugging Face Qwen3 checkpoint directory, tokenizer included).

  Raises:
    FileNotFoundError: the package was installed without its assets; rebuild the model with
      ``python scripts/build_demo_model.py``.
  """
  path = os.fspath(importlib.resources.files("oel_jax") / "assets" / "demo_model")
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(
        f"demo model not found at {path} (model.safetensors missing): the package data "
        "`oel_jax/assets/demo_model/` was not installed; reinstall the package, or rebuild it "
        "with `python scripts/build_demo_model.py`")
  return path


__all__ = ["DEMO_CONTROLS", "DEMO_LAKE", "demo_model_path"]
