"""Server side, stage 2: consolidating experiential knowledge into the weights.

On-policy context distillation (arXiv:2603.16856 section 3.3; DESIGN.md 5.3): the student
answers trajectory prefixes without the knowledge, and is trained to match a frozen teacher (the
model as it was at the start of the round) that sees a knowledge text in its prompt, through the
top-k reverse KL of `oel_jax.train`.

    config = ConsolidationConfig(steps=20, train=TrainConfig(learning_rate=5e-6))
    result = run_consolidation(model, model, tokenizer, load_trajectories("consolidate.jsonl"),
                               load_knowledge_set("knowledge").texts, config,
                               workdir="round1/consolidate")
    result.model          # the consolidated Qwen3; result.metrics: one dict per step

What each step does, and how it follows the official implementation (microsoft/LMOps,
``oel/verl/verl/trainer/ppo/ray_trainer.py``, ``fit`` with ``stage=consolidate``;
``oel/scripts/textgame_consolidate.sh`` for the settings):

- Prefixes (`build_prefixes`): every turn of every consolidation trajectory gives one prefix,
  the prompt the model saw at that turn (no knowledge): its ``Turn.content`` rendered by its
  ``Turn.prompt_format`` (`oel_jax.prompts.formats`), or, for a turn recorded without them,
  its ``Turn.prompt`` read as our game prompt. Officially each
  step's batch is every turn (``history``) of 64 freshly played games; here the games were
  played beforehand (trajectory files), and step ``s`` takes the next ``games_per_step`` games
  of a seeded per-epoch permutation (`ConsolidationConfig.shuffle`), each with all its turns (at
  most `max_prefixes_per_game`, a seeded subset beyond that). With at least ``steps *
  games_per_step`` games no game is used twice, as officially.
- Responses: the current student samples one reply per prefix (official ``rollout.n=1``,
  temperature 0.7, top-p 1, no top-k, ``max_response_length=1024``), from the prefix rendered
  with the chat template (thinking on or off, the official ``not textgame_no_think``). The
  sampler gets the student's new weights after every optimizer step (the official rollout engine
  is synced to the actor every step).
- Teacher inputs: per row, a knowledge text drawn uniformly at random (with replacement) from
  the set (official ``rng.choice(EXPERIENCES)`` per sample), put into the prompt by the
  prefix's format (`insert_knowledge`; the game format's knowledge block, an empty text giving
  no block, as officially; a turn recorded without its content gets the block spliced into
  its recorded prompt, `oel_jax.prompts.formats.RECORDED_GAME`), rendered
  with the same chat template and thinking flag, followed by the *same* response tokens.
- Loss (`oel_jax.train.Trainer`): scored response tokens are the reply up to and including its
  first stop token; a reply cut at the token budget is scored as it is (official
  ``get_response_mask``). One optimizer step per batch.
- Teacher: the round-start model, frozen (official ``ref`` worker); its parameters are never
  written (the train state holds a copy of the student's). Being frozen, it reads each
  knowledge text's shared prompt prefix once per round (`ConsolidationConfig.teacher_prefix_cache`,
  `oel_jax.teacher_prefix`): each step's teacher rows hold only what follows the part of their
  text's cached prefix they start with (the ``teacher_len`` metric counts those tokens,
  ``teacher_cached_tokens`` the mean cached ones per row). Same loss and gradients as reading
  whole prompts, up to float rounding; the official code reads them whole every step.
- Non-finite steps: a step whose loss or gradient norm is NaN or infinite is skipped, as
  officially: the train state (parameters, optimizer state, its step count) stays exactly as it
  was, the step still counts (its games are used up, its metrics line says ``skipped: true``,
  with ``loss``/``grad_norm`` null when not finite) and a warning is logged.
  `ConsolidationConfig.max_consecutive_skipped_steps` skipped steps in a row stop the round with
  `oel_jax.train.NonFiniteLossError`.

Per-step metrics (`ConsolidationResult.metrics`, ``metrics.jsonl``) hold, besides the loss and
gradient norm, token means over the scored tokens of each model's entropy
(``student_entropy``, ``teacher_entropy``) and of its probability mass on the loss's support S
(``student_topk_mass``, ``teacher_topk_mass``: how much of the distributions the top-k sum
sees; 1 for the full vocabulary), at the loss temperature; ``skipped`` and the round's running
``skipped_steps``.

Baselines (DESIGN.md 5.3, issue 6 part 4):

- ``mode="off_policy"``: off-policy context distillation. The *teacher*, with the knowledge in
  its prompt, samples the replies, and the loss is the forward KL (`oel_jax.losses.FORWARD_KL`,
  set in ``train.divergence``) on them (the official opcd ``generate_off_policy``, which plays
  the games with the knowledge-prompted teacher; here, with no environment on the server side,
  the teacher answers the recorded prefixes). The two modes differ only in who samples, so
  each is a small strategy object (`OnPolicy`, `OffPolicy`, by name in `POLICIES`): which
  prompts the sampler answers and whose weights it holds when.
- ``context="raw_trajectories"``: the context texts are raw trajectories instead of extracted
  knowledge (paper Table 1); build them with `raw_trajectory_contexts` and pass them as
  ``knowledge``. They go in the same knowledge block.

Randomness and resuming. Every random choice of step ``s`` (which games, which turns, which
knowledge text per row, the sampling seed) is a function of ``(config.seed, s)`` alone, so the
data position is the step count. With ``workdir``, orbax checkpoints of the train state (student
parameters, optimizer state, step) plus JSON metadata (step, data position, the metrics so far
and a fingerprint of the config and inputs) are written to ``workdir/checkpoints`` every
`checkpoint_every` steps and at the end; one metrics line per step is appended to
``workdir/metrics.jsonl``. Calling `run_consolidation` again with the same inputs continues
from the latest checkpoint: ``metrics.jsonl`` is rewritten to the checkpoint's steps (lines
written after it are dropped) and the run goes on. The final weights and the (non-timing)
metrics equal those of an uninterrupted run, bit for bit on the same machine.

Code layout: ``config`` (`ConsolidationConfig`), ``inputs`` (prefixes, each step's rows and
the student's and teacher's prompts, the batch, raw-trajectory contexts), ``policies`` (who
samples: `OnPolicy`, `OffPolicy`), ``checkpoints`` (orbax checkpoints, metrics lines, the
fingerprint a resume must match) and ``run`` (`run_consolidation`: inputs checked and rendered
once, a train state restored or made, then steps, each one sample-batch-train call and a
metrics line). This package re-exports their public names.

The teacher's prompt comes from `insert_knowledge` as this package names it, looked up at
every call: replacing ``oel_jax.consolidate.insert_knowledge`` (e.g. by one that returns the
prefix unchanged, ``scripts/demo_failure_checks.py``'s ``stale_teacher`` break) changes every
teacher prompt of a run.

Shapes. The jitted train step compiles once per batch shape, so the rows and the three lengths
of the `DistillBatch` (student sequence, teacher sequence, response) are padded up to buckets
(`bucket_size`: `length_buckets_per_doubling` sizes per power of two, at least
`min_length_bucket`); padding rows have no scored tokens and change neither loss nor gradient.

Differences from the official code, on purpose: the loss is the token mean over the whole batch
(officially a per-micro-batch token mean weighted by rows); prompts are never truncated (the
sampler raises when one does not fit, where the official code right-truncates at
``max_prompt_length``, which its settings make long enough for every game prompt).
"""

from oel_jax.consolidate.checkpoints import (CHECKPOINT_DIR, META_KIND, META_VERSION,
                                             METRICS_FILE, RESUMABLE_FIELDS, TIMING_KEYS,
                                             _default_fingerprint_config, _with_defaults,
                                             abstract_state)
from oel_jax.consolidate.config import CONTEXTS, MODES, ConsolidationConfig
from oel_jax.consolidate.inputs import (Prefix, StepInputs, build_batch, build_prefixes,
                                        draw_contexts, encode_prompt, group_by_game,
                                        insert_knowledge, raw_trajectory_contexts,
                                        sampling_seed, select_prefixes, step_inputs,
                                        teacher_prefix_ids)
from oel_jax.consolidate.policies import POLICIES, OffPolicy, OnPolicy
from oel_jax.consolidate.run import ConsolidationResult, run_consolidation
from oel_jax.sampling import bucket_size

__all__ = [
    "CHECKPOINT_DIR", "META_KIND", "META_VERSION", "METRICS_FILE", "RESUMABLE_FIELDS",
    "TIMING_KEYS", "abstract_state", "CONTEXTS", "MODES", "ConsolidationConfig", "Prefix",
    "StepInputs", "build_batch", "build_prefixes", "draw_contexts", "encode_prompt",
    "group_by_game", "insert_knowledge", "raw_trajectory_contexts", "sampling_seed",
    "select_prefixes", "step_inputs", "teacher_prefix_ids", "POLICIES", "OffPolicy", "OnPolicy",
    "ConsolidationResult", "run_consolidation", "bucket_size",
]
