"""The learning demo's config, the main job's default: the ordinary loop on lake Ossa with the
demo model.

The model is the one ``scripts/build_demo_model.py`` writes to ``oel_jax/assets/demo_model/``
(shipped; see the README's "The learning demo"). Lake Ossa (3x3, no visible holes) has thin
ice in the whole left column below the start: holes the board draws as ice, a layout the
model never saw in training (pretraining lakes have none, one cell of the left column, or
thin ice in the top row). A player that moves down first, as the model does without
knowledge, falls through. Nothing but the env settings, the sizes and the model path is
demo-specific.

    python -m oel_jax.main                      # the default config is this file
    python scripts/build_demo_model.py          # rebuilds the model: about 25 minutes on two CPU cores

It lives in the package (``configs/demo.py`` re-exports it) so that a pip-installed oel_jax
has it too.
"""

import os

from oel_jax.demo.curriculum import DEMO_WORLD
from oel_jax.demo.paths import demo_model_path
from oel_jax.errors import InputError
from oel_jax.loop import default_config


def get_config():
  model = demo_model_path()
  if not os.path.isfile(os.path.join(model, "model.safetensors")):
    raise InputError(f"the demo model is not built: {model} holds no model.safetensors; run "
                     "`python scripts/build_demo_model.py` first")
  c = default_config()
  c.name = "demo"
  c.model = model
  c.param_dtype = "float32"
  c.compute_dtype = "float32"   # XLA:CPU: float32 is faster than bf16 at this size.
  c.rounds = 1
  c.max_seq_len = 2048
  c.sampler_buckets_per_doubling = 2  # game prompts of 600 tokens pad to 768, not 1024
  c.env = "frozenlake"
  for name, value in DEMO_WORLD.settings().items():
    c.env_settings[name] = value

  c.rollout.enable_thinking = False
  c.rollout.max_new_tokens = 16

  # Extraction pool: n=16 boards x K=4 plays; run k reads play k, as officially. Sixteen
  # items per text: sampled, the model's reader names Ossa's side about seven times in ten,
  # and a text of 8 items had a wrong majority about one time in three.
  c.extraction.knowledge_format = "structured"
  c.extraction.with_previous = False
  c.extraction.num_trajectories = 16
  c.extraction.num_runs = 4
  c.extraction.max_knowledge_tokens = 512
  c.extraction.max_new_tokens = 80   # an item is 48 tokens with the end token
  c.extraction.enable_thinking = False
  c.extraction.snapshot_every = 4

  c.consolidation.steps = 8
  c.consolidation.games_per_step = 8
  c.consolidation.max_new_tokens = 16
  c.consolidation.enable_thinking = False
  c.consolidation.checkpoint_every = 8

  # Round 0's games end at the first move (a fall), so consolidation trains on first turns
  # only; at 3e-4 the student in some seeds also moved right on later turns (seeds 0-4).
  c.train.learning_rate = 1.5e-4

  c.evaluation.num_games = 32
  c.evaluation.sampling_seeds = (0,)
  c.evaluation.max_new_tokens = 16
  c.evaluation.enable_thinking = False
  c.evaluation.initial = True
  c.evaluation.in_context = True
  return c
