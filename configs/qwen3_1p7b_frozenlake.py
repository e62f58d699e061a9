"""Qwen3-1.7B (thinking) on FrozenLake, Table 4 column 1: unstructured knowledge, n = 15,
L_max = 2048, previous knowledge not in the extraction prompt, learning rate 5e-6, 20 steps.

    python -m oel_jax.main --config=configs/qwen3_1p7b_frozenlake.py \\
        --config.model=/ckpt/Qwen3-1.7B --workdir=runs/qwen3-1.7b-frozenlake
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper import paper_config  # pylint: disable=wrong-import-position


def get_config():
  return paper_config(name="qwen3-1.7b-frozenlake", model="Qwen/Qwen3-1.7B", env="frozenlake",
                      thinking=True, knowledge_format="unstructured", n=15, l_max=2048,
                      learning_rate=5e-6, steps=20, with_previous=False)
