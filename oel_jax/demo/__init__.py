"""The learning demo: a world where OEL measurably improves a small model on a CPU.

FrozenLake lakes with thin ice (`make_env("frozenlake", thin_ice=..., lake=...)`: holes the
board draws as ice), a small Qwen3 trained from scratch on the synthetic curriculum in
`oel_jax.demo.curriculum` by ``scripts/build_demo_model.py``, and ``configs/demo.py``, which
runs the ordinary loop with it in the held-out world (`DEMO_WORLD`: `DEMO_THIN_ICE` on lake
`DEMO_LAKE`).
"""

from oel_jax.demo.curriculum import (DEMO_HOLES, DEMO_LAKE, DEMO_THIN_ICE, DEMO_WORLD,
                                    MIRROR_WORLD, STANDARD_WORLD)
from oel_jax.demo.paths import demo_config_path, demo_model_path

__all__ = ["DEMO_HOLES", "DEMO_LAKE", "DEMO_THIN_ICE", "DEMO_WORLD", "MIRROR_WORLD",
           "STANDARD_WORLD", "demo_config_path", "demo_model_path"]
