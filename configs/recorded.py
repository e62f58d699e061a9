"""OEL on recorded experience: a deployment's conversations instead of our games.

Each round reads recorded trajectories (``config.collect.source = "files"``: imported chat logs,
or a serve workdir's log up to a cut-off), extracts knowledge from them with our generic
conversation prompts, consolidates it into the model (each recorded turn's prompt is a prefix),
and evaluates what the config names: nothing by default (``evaluation.games`` off; the games
need ``config.env``'s held-out maps), IF-Eval when ``--config.ifeval.enabled=True``.

    python -m oel_jax.trajectories import --input chats.jsonl --output recorded/chats.jsonl
    python -m oel_jax.main --config=configs/recorded.py --workdir=runs/recorded \\
        --config.model=Qwen/Qwen3-1.7B --config.collect.trajectory_files='recorded/*.jsonl'
    # or straight from a server's log (python -m oel_jax.serve --workdir runs/serve):
    python -m oel_jax.main --config=configs/recorded.py --workdir=runs/recorded \\
        --config.model=Qwen/Qwen3-1.7B --config.collect.trajectory_files= \\
        --config.collect.served_workdir=runs/serve \\
        --config.collect.served_until=2026-12-01T09:00:00Z

``collect.trajectory_files`` defaults to ``recorded/*.jsonl`` (relative to where the command
runs); empty it to read a server's log alone.

``configs/recorded.py:tiny`` is the same with the built-in tiny random model and the tiny
plumbing sizes of ``configs/tiny.py`` (a CPU check of the wiring in a minute or two; it learns
nothing).

Extraction reads the recorded pool in a seeded order per run (``pool_order "shuffle"``: the
records are not K plays of n boards), so the pool needs at least ``num_trajectories`` records.
One round by default: serve, record, learn, reload (``--config.rounds`` for more; see
``collect.later_rounds`` for what later rounds read).
"""

from oel_jax.loop import default_config


def get_config(size: str = ""):
  c = default_config()
  c.name = "recorded"
  c.rounds = 1
  c.collect.source = "files"
  c.collect.trajectory_files = "recorded/*.jsonl"
  c.extraction.pool_order = "shuffle"
  c.extraction.num_trajectories = 16
  c.evaluation.games = False
  c.evaluation.initial = False
  c.evaluation.in_context = False
  if size == "tiny":
    c.name = "recorded_tiny"
    c.model = "tiny"
    c.param_dtype = "float32"
    c.compute_dtype = "float32"
    c.max_seq_len = 4096
    c.extraction.knowledge_format = "unstructured"
    c.extraction.with_previous = False
    c.extraction.num_trajectories = 2
    c.extraction.num_runs = 2
    c.extraction.max_knowledge_tokens = 128
    c.extraction.max_new_tokens = 32
    c.extraction.enable_thinking = False
    c.consolidation.steps = 2
    c.consolidation.games_per_step = 2
    c.consolidation.max_new_tokens = 32
    c.consolidation.enable_thinking = False
    c.train.learning_rate = 1e-4
  elif size:
    raise ValueError(f"configs/recorded.py: unknown size {size!r} (only 'tiny')")
  return c
