"""Qwen3-4B (thinking) on FrozenLake, Table 4 column 2: structured knowledge, n = 25,
L_max = 8192, learning rate 1e-6, 20 steps.

    python -m oel_jax.main --config=configs/qwen3_4b_frozenlake.py \\
        --config.model=/ckpt/Qwen3-4B --workdir=runs/qwen3-4b-frozenlake
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper import paper_config  # pylint: disable=wrong-import-position


def get_config():
  return paper_config(name="qwen3-4b-frozenlake", model="Qwen/Qwen3-4B", env="frozenlake",
                      thinking=True, knowledge_format="structured", n=25, l_max=8192,
                      learning_rate=1e-6, steps=20)
