"""The paper's settings shared by its four model-task pairs (arXiv:2603.16856, Tables 3-4,
Appendix B; DESIGN.md section 5). Not a config itself: the four configs beside it call
`paper_config` with Table 4's row.

Shared: K = 10 knowledge texts per round, each accumulated over n trajectories (the pool is
K plays of the same n boards, run k reading play k, as the official code plays them);
consolidation with 64 games per step (the paper's number; the released deploy scripts leave
``data.train_batch_size`` at 128: ``--config.consolidation.games_per_step=128``), one response
of up to 1024 tokens per prefix sampled at temperature 0.7 (top-p 1), top-256 reverse KL at
temperature 0.7, AdamW (0.9, 0.999), weight decay 0.01, constant learning rate, clipping at
1.0, bf16 compute; deployment games of up to 5 turns and 1024 tokens per reply, the
extraction pool's at the evaluation settings (temperature 0.7, top-p 0.8, top-k 20: the
official extraction rollouts run in validate mode) and the consolidation pool's at
temperature 0.7, top-p 1; evaluation on 128 held-out maps at temperature 0.7, top-p 0.8,
top-k 20, over 10 sampling seeds; IF-Eval prompt-level strict accuracy after every round when
its data is found (``$OEL_IFEVAL_PATH``, or ``../shared/data/ifeval/input_data.jsonl`` beside
the checkout; else set ``--config.ifeval.path``), run as the official README runs it (thinking
off for every model, temperature 0.7, top-p 0.8, top-k 20, seed 42, 1280 new tokens).
Exports in bfloat16 for serving.

``model`` is the hub id; pass the local checkpoint directory with ``--config.model=DIR``
(no download happens at run time).
"""

from oel_jax.loop import default_config, default_ifeval_path


def paper_config(*, name, model, env, thinking, knowledge_format, n, l_max, learning_rate,
                 steps, with_previous=True):
  """One row of Table 4 on top of the shared settings."""
  c = default_config()
  c.name = name
  c.model = model
  c.param_dtype = "float32"
  c.compute_dtype = "bfloat16"
  c.rounds = 3
  c.max_seq_len = 32768          # Extraction: L_max of knowledge + a 5-turn trajectory + L_max new.
  c.env = env

  c.rollout.enable_thinking = thinking
  c.rollout.max_new_tokens = 1024
  # The extraction pool is played as the official extraction rollouts (validate mode), the
  # consolidation pool as its deployment rollouts.
  c.collect.extraction_sampling.temperature = 0.7
  c.collect.extraction_sampling.top_p = 0.8
  c.collect.extraction_sampling.top_k = 20
  c.collect.consolidation_sampling.temperature = 0.7
  c.collect.consolidation_sampling.top_p = 1.0
  c.collect.consolidation_sampling.top_k = 0

  c.extraction.knowledge_format = knowledge_format
  c.extraction.with_previous = with_previous
  c.extraction.num_trajectories = n
  c.extraction.num_runs = 10
  c.extraction.max_knowledge_tokens = l_max
  c.extraction.enable_thinking = thinking
  c.extraction.pool_order = "chunks"

  c.consolidation.steps = steps
  c.consolidation.games_per_step = 64
  c.consolidation.max_new_tokens = 1024
  c.consolidation.temperature = 0.7
  c.consolidation.top_p = 1.0
  c.consolidation.enable_thinking = thinking
  c.consolidation.checkpoint_every = 5

  c.train.learning_rate = learning_rate
  c.train.k = 256
  c.train.temperature = 0.7

  c.evaluation.num_games = 128
  c.evaluation.sampling_seeds = tuple(range(10))
  c.evaluation.max_new_tokens = 1024
  c.evaluation.enable_thinking = thinking
  c.evaluation.in_context = True

  # IF-Eval as the official README runs it, for every model: thinking off, temperature 0.7,
  # top-p 0.8, top-k 20, seed 42, 1280 new tokens (default_config's ifeval section).
  c.ifeval.path = default_ifeval_path()
  c.ifeval.enabled = bool(c.ifeval.path)

  c.export.dtype = "bfloat16"
  return c
