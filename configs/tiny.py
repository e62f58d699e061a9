"""The tiny default: two short OEL rounds on a CPU in a few minutes (the README's main job).

The built-in tiny Qwen3 (random weights, 2,048-token vocabulary) plays FrozenLake, extracts
unstructured knowledge (its random replies hold no ``- EXPERIENCE ITEM:`` lines), consolidates
for two steps and is evaluated on eight held-out maps, in context too, and on four IF-Eval
prompts when IF-Eval's data is beside the checkout (``$OEL_IFEVAL_PATH`` or
``../shared/data/ifeval/input_data.jsonl``). Every size here is for speed, not for learning.

    python -m oel_jax.main --config=configs/tiny.py --workdir=runs/tiny
"""

from oel_jax.loop import default_config, default_ifeval_path


def get_config():
  c = default_config()
  c.name = "tiny"
  c.model = "tiny"
  c.param_dtype = "float32"
  c.compute_dtype = "float32"   # XLA:CPU: float32 decode is faster than bf16 at this size.
  c.rounds = 2
  c.max_seq_len = 4096
  c.env = "frozenlake"

  c.rollout.enable_thinking = False
  c.rollout.max_new_tokens = 48

  # Extraction pool: n=2 boards x K=2 plays (run k reads play k); 2 x 2 consolidation games
  # (8 games in all: the same sampler batch bucket as the 8 evaluation games).
  c.extraction.knowledge_format = "unstructured"
  c.extraction.with_previous = False
  c.extraction.num_trajectories = 2
  c.extraction.num_runs = 2
  c.extraction.max_knowledge_tokens = 128
  c.extraction.max_new_tokens = 32
  c.extraction.enable_thinking = False
  c.extraction.snapshot_every = 1

  c.consolidation.steps = 2
  c.consolidation.games_per_step = 2
  c.consolidation.max_new_tokens = 32
  c.consolidation.enable_thinking = False
  c.consolidation.checkpoint_every = 1

  c.train.learning_rate = 1e-4    # Large enough that the tiny model's weights visibly move.

  c.evaluation.num_games = 8
  c.evaluation.sampling_seeds = (0,)
  c.evaluation.max_new_tokens = 48
  c.evaluation.enable_thinking = False
  c.evaluation.initial = True
  c.evaluation.in_context = True

  c.ifeval.path = default_ifeval_path()
  c.ifeval.enabled = bool(c.ifeval.path)
  c.ifeval.limit = 4
  c.ifeval.max_new_tokens = 32
  c.ifeval.batch_size = 4
  c.ifeval.enable_thinking = False
  return c
