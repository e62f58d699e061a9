"""The learning demo (the README's main job): OEL measurably improves a small model on a CPU.

The model (``oel_jax/assets/demo_model/``, built by ``scripts/build_demo_model.py``) is a
3.7M-parameter Qwen3 trained from scratch on a synthetic curriculum of FrozenLake on lakes
whose controls are permuted (see the README's "The learning demo"). It is deployed on lake
Ossa (3x3, no holes), whose controls it never saw: ``[up]`` moves left, ``[down]`` right, ``[left]`` up and
``[right]`` down. Without knowledge it assumes standard controls and mostly fails; each round
it plays, extracts structured knowledge from its own games with its own weights, and is
consolidated by on-policy top-k reverse KL against its frozen round-start self with that
knowledge in context. Nothing but the env settings and the model path is demo-specific.

    python -m oel_jax.main --config=configs/demo.py --workdir=runs/demo

It lives in the package (``configs/demo.py`` re-exports it) so that a pip-installed oel_jax,
without this repository's ``configs/`` folder, runs the demo too: ``python -m oel_jax.main``
falls back to this file.
"""

from oel_jax.demo.curriculum import DEMO_CONTROLS, DEMO_HOLES, DEMO_LAKE
from oel_jax.demo.paths import demo_model_path
from oel_jax.loop import default_config


def get_config():
  c = default_config()
  c.name = "demo"
  c.model = demo_model_path()
  c.param_dtype = "float32"
  c.compute_dtype = "float32"   # XLA:CPU: float32 is faster than bf16 at this size.
  c.rounds = 2
  c.max_seq_len = 2048
  c.env = "frozenlake"
  c.env_settings.controls = DEMO_CONTROLS
  c.env_settings.lake = DEMO_LAKE
  c.env_settings.num_holes = DEMO_HOLES

  c.rollout.enable_thinking = False
  c.rollout.max_new_tokens = 16

  # Extraction pool: n=8 boards x K=4 plays; run k reads play k, as officially.
  c.extraction.knowledge_format = "structured"
  c.extraction.with_previous = False
  c.extraction.num_trajectories = 8
  c.extraction.num_runs = 4
  c.extraction.max_knowledge_tokens = 512
  c.extraction.max_new_tokens = 48
  c.extraction.enable_thinking = False
  c.extraction.snapshot_every = 4

  c.consolidation.steps = 10
  c.consolidation.games_per_step = 8
  c.consolidation.max_new_tokens = 16
  c.consolidation.enable_thinking = False
  c.consolidation.checkpoint_every = 10

  c.train.learning_rate = 3e-4

  c.evaluation.num_games = 32
  c.evaluation.sampling_seeds = (0,)
  c.evaluation.max_new_tokens = 16
  c.evaluation.enable_thinking = False
  c.evaluation.initial = True
  c.evaluation.in_context = True
  return c
