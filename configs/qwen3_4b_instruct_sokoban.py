"""Qwen3-4B-Instruct-2507 (non-thinking) on Sokoban, Table 4 column 4: structured knowledge,
n = 50, L_max = 8192, learning rate 1e-6, 100 steps. Thinking is off everywhere (the
Instruct-2507 template has no thinking mode; the official ``textgame_no_think``).

    python -m oel_jax.main --config=configs/qwen3_4b_instruct_sokoban.py \\
        --config.model=/ckpt/Qwen3-4B-Instruct-2507 --workdir=runs/qwen3-4b-instruct-sokoban
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper import paper_config  # pylint: disable=wrong-import-position


def get_config():
  return paper_config(name="qwen3-4b-instruct-2507-sokoban", model="Qwen/Qwen3-4B-Instruct-2507",
                      env="sokoban", thinking=False, knowledge_format="structured", n=50,
                      l_max=8192, learning_rate=1e-6, steps=100)
