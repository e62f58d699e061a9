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
  written (the train state holds a copy of the student's).
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

Code layout: `run_consolidation` checks and renders its inputs once (`_inputs`), restores the
latest checkpoint or makes a fresh train state (`_restore`), and runs the steps (`_run_steps`),
each one `_Stepper` call (sample, batch, train step) and a metrics line.

Shapes. The jitted train step compiles once per batch shape, so the rows and the three lengths
of the `DistillBatch` (student sequence, teacher sequence, response) are padded up to buckets
(`bucket_size`: `length_buckets_per_doubling` sizes per power of two, at least
`min_length_bucket`); padding rows have no scored tokens and change neither loss nor gradient.

Differences from the official code, on purpose: the loss is the token mean over the whole batch
(officially a per-micro-batch token mean weighted by rows); prompts are never truncated (the
sampler raises when one does not fit, where the official code right-truncates at
``max_prompt_length``, which its settings make long enough for every game prompt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from oel_jax import chat, engine, experience, losses, settings
from oel_jax.atomic_write import atomic_write_text
from oel_jax.envs import Trajectory, Turn
from oel_jax.models.qwen3 import Qwen3
from oel_jax.prompts import formats
from oel_jax.sampling import Sampler, bucket_size
from oel_jax.train import (DistillBatch, NonFiniteLossError, TrainConfig, Trainer, TrainState,
                           make_batch)

_log = logging.getLogger(__name__)

MODES = ("on_policy", "off_policy")
CONTEXTS = ("knowledge", "raw_trajectories")

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
META_KIND = "oel_jax.consolidation_checkpoint"
META_VERSION = 1

TIMING_KEYS = ("sampling_time", "train_time", "step_time", "tokens_per_second",
               "sampled_tokens_per_second")
"""Metrics that measure time (they differ between otherwise identical runs)."""

RESUMABLE_FIELDS = ("steps", "checkpoint_every", "keep_checkpoints",
                    "max_consecutive_skipped_steps")
"""Config fields that may change between an interrupted run and its resumption."""

# Tags that keep the random streams of one step apart.
_ORDER, _TURNS, _CONTEXT, _SAMPLE = 1, 2, 3, 4


def _seed(*parts: int) -> np.random.SeedSequence:
  return np.random.SeedSequence([int(p) for p in parts])


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class ConsolidationConfig:
  """Settings of the consolidation stage (defaults: the official scripts, paper Table 4)."""

  steps: int = settings.integer(20, minimum=1)
  """Optimizer steps (paper: 20 for Qwen3-1.7B/4B FrozenLake, 100 otherwise)."""

  games_per_step: int = settings.integer(64, minimum=1)
  """Games whose prefixes make one batch (official ``data.train_batch_size=64``)."""

  max_prefixes_per_game: int | None = settings.integer(5, minimum=1, optional=True)
  """Most prefixes taken from one game (a seeded subset of its turns beyond that); None for all
  turns. Our games stop after 5 turns, so 5 takes every turn, as officially."""

  max_new_tokens: int = settings.max_new_tokens(1024)
  """Token budget of a sampled reply, reasoning included (official ``max_response_length``)."""

  temperature: float = settings.temperature(0.7)
  """Sampling temperature (official 0.7). Must equal ``train.temperature``, which the loss
  applies to both models' logits."""

  top_p: float = settings.top_p(1.0)
  """Nucleus sampling mass in (0, 1] (official: 1, off)."""

  top_k: int = settings.top_k(0)
  """Top-k sampling cut, 0 for none (official: none)."""

  enable_thinking: bool = settings.boolean(True)
  """Render student and teacher prompts with thinking on (Qwen3 thinking models; the official
  ``not textgame_no_think``). Templates without the flag ignore it."""

  mode: str = settings.choice("on_policy", MODES)
  """``"on_policy"``: the student samples, loss reverse top-k KL (OEL). ``"off_policy"``: the
  knowledge-prompted teacher samples, loss forward KL (``train.divergence`` must be
  `oel_jax.losses.FORWARD_KL`); the paper's baseline."""

  context: str = settings.choice("knowledge", CONTEXTS)
  """What the teacher's context texts are: ``"knowledge"`` (the extracted knowledge set) or
  ``"raw_trajectories"`` (the paper's raw-trajectory baseline: texts from
  `raw_trajectory_contexts`). Recorded with the run; the texts are used the same way."""

  train: TrainConfig = settings.section(TrainConfig)
  """Optimizer and loss settings (learning rate, k, divergence, micro-batches, ...)."""

  seed: int = settings.integer(0, minimum=0)
  """Base seed: each step's games, turns, knowledge draws and sampling seed derive from
  ``(seed, step)``."""

  shuffle: bool = settings.boolean(True)
  """Games are taken in a seeded permutation per pass over the trajectories (True) or in the
  given order (False)."""

  checkpoint_every: int = settings.integer(5, minimum=0)
  """With a workdir, save a checkpoint every this-many steps (and always after the last);
  0: only after the last."""

  keep_checkpoints: int = settings.integer(1, minimum=1)
  """Checkpoints kept in ``workdir/checkpoints`` (older ones are deleted after a newer one is
  complete)."""

  min_length_bucket: int = settings.integer(64, minimum=1)
  """Smallest padded length of the batch's student and teacher sequences (and of its
  responses, unless `max_new_tokens` is smaller)."""

  length_buckets_per_doubling: int = settings.integer(2, minimum=1)
  """Padded sizes per power of two (1: powers of two, at most 2x padding; 2: also 1.5x
  powers, at most 1.5x; more sizes waste less compute and compile more programs). Also used
  for the rows."""

  min_row_bucket: int = settings.integer(1, minimum=1)
  """Smallest padded number of rows in a batch."""

  max_sampling_batch: int | None = settings.integer(None, minimum=1, optional=True)
  """Most prompts per sampler call (the step's prompts are split into several calls); None:
  all in one call."""

  max_consecutive_skipped_steps: int = settings.integer(3, minimum=1)
  """A step whose loss or gradient is not finite is skipped (the train state is left exactly
  as it was, as officially; the step still counts and its metrics line says
  ``skipped: true``); this many skipped steps in a row stop the round with
  `oel_jax.train.NonFiniteLossError`. May change when a run is resumed."""

  def __post_init__(self):
    settings.check(self)

  def cross_checks(self, at: settings.At) -> list[str]:
    """The sampling temperature is the loss's, and the mode fixes the divergence's family."""
    out = []
    # Temperature 0 (greedy) is a valid sampling setting; here it is refused through
    # train.temperature (> 0), the loss's own rule.
    if at.ok("temperature", "train.temperature") and not math.isclose(
        self.train.temperature, self.temperature, rel_tol=0, abs_tol=1e-12):
      out.append(f"{at('temperature')} ({self.temperature}) differs from "
                 f"{at('train.temperature')} ({self.train.temperature}): the loss scores the "
                 "replies at the temperature they were sampled at; set both to the same value")
    if at.ok("mode", "train.divergence"):
      divergence = self.train.divergence
      if self.mode == "off_policy" and divergence != losses.FORWARD_KL:
        out.append(f"{at('mode')}='off_policy' trains with the forward KL on teacher samples: "
                   f"set {at('train.divergence')}={losses.FORWARD_KL!r} (got {divergence!r})")
      if self.mode == "on_policy" and divergence == losses.FORWARD_KL:
        out.append(f"{at('mode')}='on_policy' trains with a reverse KL on student samples; "
                   f"{at('train.divergence')}={losses.FORWARD_KL!r} belongs to "
                   "mode='off_policy'")
    return out

  @property
  def sampling_params(self) -> settings.SamplingParams:
    """The settings of each sampler call (student or, off-policy, teacher)."""
    return settings.SamplingParams(temperature=self.temperature, top_k=self.top_k,
                                   top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                                   enable_thinking=self.enable_thinking)

  def to_dict(self) -> dict[str, Any]:
    """The settings as JSON data (``train`` as a nested object)."""
    return settings.to_dict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> ConsolidationConfig:
    """Builds a config from `to_dict` data; unknown keys are an error."""
    return settings.load(cls, data)


# ---------------------------------------------------------------------------------------------
# Prefixes and per-step data.


@dataclasses.dataclass(frozen=True)
class Prefix:
  """One training prompt: one turn of one trajectory, rendered through its prompt format."""

  content: str
  """The turn's knowledge-free content (``Turn.content``; for a turn recorded without it, the
  whole recorded prompt)."""

  game: int
  """Index of its trajectory in the list given to `build_prefixes`."""

  turn: int
  """Index of the turn in that trajectory (0 = the first)."""

  format: formats.PromptFormat = formats.RECORDED_GAME
  """Renders `content` (and `knowledge`) into chat messages: the turn's ``prompt_format``,
  or `oel_jax.prompts.formats.RECORDED_GAME` for a turn recorded without one."""

  knowledge: str | None = None
  """The knowledge text the prompt carries (None: the student's prompt)."""

  def messages(self) -> list[formats.Message]:
    """The chat messages of this prompt."""
    return self.format.messages(self.content, self.knowledge)

  @property
  def prompt(self) -> str:
    """The user message's text (the knowledge-free prefix: the prompt the model saw)."""
    return formats.user_text(self.messages())


def insert_knowledge(prefix: Prefix, knowledge: str | None) -> Prefix:
  """The prefix as the teacher sees it: with ``knowledge`` in its prompt (its format's way)."""
  return dataclasses.replace(prefix, knowledge=knowledge or None)


def _turn_prefix(turn: Turn, game: int, index: int) -> Prefix:
  """A turn's prefix: rendered by its prompt format, or parsed as our game prompt without one."""
  if turn.prompt_format is None:
    return Prefix(content=turn.prompt, game=game, turn=index)
  try:
    fmt = formats.get_format(turn.prompt_format)
  except ValueError as e:
    raise ValueError(f"trajectory {game}, turn {index}: {e}") from None
  return Prefix(content=turn.content, game=game, turn=index, format=fmt)


def build_prefixes(trajectories: Sequence[Trajectory]) -> list[Prefix]:
  """Every turn of every trajectory, in order, as one `Prefix` each.

  Raises:
    TypeError: an item is not a `Trajectory`.
    ValueError: a turn names a prompt format not in `oel_jax.prompts.formats.FORMATS`.
  """
  out = []
  for g, trajectory in enumerate(trajectories):
    if not isinstance(trajectory, Trajectory):
      raise TypeError(f"trajectories[{g}] is a {type(trajectory).__name__}, not a Trajectory")
    out.extend(_turn_prefix(turn, g, t) for t, turn in enumerate(trajectory.turns))
  return out


def group_by_game(prefixes: Sequence[Prefix]) -> list[list[int]]:
  """Prefix indices per game (games in order of first appearance; games with no turn absent)."""
  games: dict[int, list[int]] = {}
  for i, p in enumerate(prefixes):
    games.setdefault(p.game, []).append(i)
  return list(games.values())


def select_prefixes(games: Sequence[Sequence[int]], config: ConsolidationConfig,
                    step: int) -> list[int]:
  """The prefix indices that make the batch of ``step`` (1-based), a function of (seed, step).

  Step ``s`` takes games ``(s-1)*G .. s*G-1`` of the endless sequence made of one permutation
  of all games per pass (`ConsolidationConfig.shuffle`), and of each game all its prefixes, or
  a seeded subset of `max_prefixes_per_game` of them (kept in turn order).
  """
  n, g = len(games), config.games_per_step
  if n == 0:
    raise ValueError("select_prefixes: no games")
  orders: dict[int, np.ndarray] = {}
  rows: list[int] = []
  for j, position in enumerate(range((step - 1) * g, step * g)):
    epoch, index = divmod(position, n)
    if epoch not in orders:
      orders[epoch] = (np.random.default_rng(_seed(config.seed, _ORDER, epoch)).permutation(n)
                       if config.shuffle else np.arange(n))
    turns = list(games[int(orders[epoch][index])])
    cap = config.max_prefixes_per_game
    if cap is not None and len(turns) > cap:
      rng = np.random.default_rng(_seed(config.seed, _TURNS, step, j))
      turns = [turns[k] for k in sorted(rng.choice(len(turns), cap, replace=False).tolist())]
    rows.extend(turns)
  return rows


def draw_contexts(rows: int, num_contexts: int, config: ConsolidationConfig,
                  step: int) -> list[int]:
  """One context (knowledge text) index per row, uniform with replacement, from (seed, step)."""
  rng = np.random.default_rng(_seed(config.seed, _CONTEXT, step))
  return rng.integers(0, num_contexts, size=rows).tolist()


def sampling_seed(seed: int, step: int, chunk: int = 0) -> int:
  """The sampler seed of chunk ``chunk`` of step ``step``."""
  return int(_seed(seed, _SAMPLE, step, chunk).generate_state(1, np.uint32)[0])


def encode_prompt(tokenizer: Any, prefix: Prefix, *, enable_thinking: bool) -> list[int]:
  """A prefix's messages rendered with the tokenizer's chat template, as token ids."""
  return chat.encode_chat(tokenizer, prefix.messages(), enable_thinking=enable_thinking)


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What one step feeds the sampler and the loss, before the replies exist."""

  step: int
  """The step (1-based)."""

  prefixes: tuple[int, ...]
  """Prefix index per row."""

  contexts: tuple[int, ...]
  """Knowledge (context) text index per row."""

  student_prompts: tuple[tuple[int, ...], ...]
  """Per row, the student's prompt token ids (prefix, no knowledge, chat template)."""

  teacher_prompts: tuple[tuple[int, ...], ...]
  """Per row, the teacher's prompt token ids (prefix with the knowledge block)."""


def step_inputs(prefixes: Sequence[Prefix], games: Sequence[Sequence[int]],
                knowledge: Sequence[str], tokenizer: Any, config: ConsolidationConfig,
                step: int, student_cache: dict[int, tuple[int, ...]] | None = None
                ) -> StepInputs:
  """Chooses the rows of ``step`` and renders the student's and the teacher's prompts."""
  rows = select_prefixes(games, config, step)
  contexts = draw_contexts(len(rows), len(knowledge), config, step)
  cache = {} if student_cache is None else student_cache
  student, teacher = [], []
  for i, c in zip(rows, contexts):
    if i not in cache:
      cache[i] = tuple(encode_prompt(tokenizer, prefixes[i],
                                     enable_thinking=config.enable_thinking))
    student.append(cache[i])
    teacher.append(tuple(encode_prompt(tokenizer, insert_knowledge(prefixes[i], knowledge[c]),
                                       enable_thinking=config.enable_thinking)))
  return StepInputs(step=step, prefixes=tuple(rows), contexts=tuple(contexts),
                    student_prompts=tuple(student), teacher_prompts=tuple(teacher))


def build_batch(student_prompts: Sequence[Sequence[int]], teacher_prompts: Sequence[Sequence[int]],
                responses: Sequence[Sequence[int]], *, pad_id: int, config: ConsolidationConfig,
                row_multiple: int = 1) -> DistillBatch:
  """The `DistillBatch` of one step, its rows and lengths padded up to buckets.

  Row i is ``student_prompts[i] + responses[i]`` / ``teacher_prompts[i] + responses[i]``, every
  response token scored. Padding rows (a single pad token each) have no scored token.
  """
  b = len(responses)
  rows = bucket_size(b, config.min_row_bucket, config.length_buckets_per_doubling, row_multiple)
  sizes = [bucket_size(max(len(p) + len(r) for p, r in zip(prompts, responses)),
                       config.min_length_bucket, config.length_buckets_per_doubling)
           for prompts in (student_prompts, teacher_prompts)]
  response_len = bucket_size(max(len(r) for r in responses),
                             min(config.min_length_bucket, config.max_new_tokens),
                             config.length_buckets_per_doubling)
  filler = [[pad_id]] * (rows - b)
  batch = make_batch(list(student_prompts) + filler, list(teacher_prompts) + filler,
                     list(responses) + filler, pad_id=pad_id, student_len=sizes[0],
                     teacher_len=sizes[1], response_len=response_len)
  if rows > b:
    mask = np.asarray(batch.response_mask).copy()
    mask[b:] = 0.0
    batch = batch.replace(response_mask=jnp.asarray(mask))
  return batch


# ---------------------------------------------------------------------------------------------
# Raw-trajectory contexts (the paper's Table 1 baseline).


def raw_trajectory_contexts(trajectories: Sequence[Trajectory], tokenizer: Any, *,
                            num_contexts: int, max_tokens: int, seed: int = 0) -> list[str]:
  """Context texts made of raw trajectories, for ``context="raw_trajectories"``.

  Context k lists the trajectories (formatted as the extractor reads them,
  `oel_jax.experience.format_trajectory`) in a seeded order of its own and keeps the last
  whole ones that fit in ``max_tokens`` tokens together (the same budget L_max as knowledge);
  when not even the last one fits, its last ``max_tokens`` tokens.
  """
  if not trajectories:
    raise ValueError("raw_trajectory_contexts: no trajectories")
  texts = [experience.format_trajectory(t) for t in trajectories]
  counts = [experience.count_tokens(tokenizer, t) for t in texts]
  out = []
  for k in range(num_contexts):
    order = np.random.default_rng(_seed(seed, k)).permutation(len(texts)).tolist()
    kept: list[int] = []
    total = 0
    for i in reversed(order):
      if total + counts[i] > max_tokens:
        break
      kept.append(i)
      total += counts[i]
    if not kept:
      ids = tokenizer.encode(texts[order[-1]], add_special_tokens=False)[-max_tokens:]
      out.append(tokenizer.decode(ids))
    else:
      out.append("".join(texts[i] for i in reversed(kept)))
  return out


# ---------------------------------------------------------------------------------------------
# Checkpoints and metrics files.


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode("utf-8")).hexdigest()


def _prefix_digest(prefixes: Sequence[Prefix], ids: Mapping[int, Sequence[int]]) -> str:
  """Digest of the prefixes' places and their rendered token ids (tokenizer and template)."""
  h = hashlib.sha256()
  for i, p in enumerate(prefixes):
    h.update(np.asarray([p.game, p.turn, len(ids[i])], np.int64).tobytes())
    h.update(np.asarray(ids[i], np.int64).tobytes())
  return h.hexdigest()


def _metrics_line(m: Mapping[str, Any]) -> str:
  return json.dumps(m, allow_nan=False) + "\n"


def _json_number(value: Any) -> Any:
  """A metrics-line value: a non-finite float (a skipped step's loss) becomes None (null)."""
  return None if isinstance(value, float) and not math.isfinite(value) else value


def _skip_counts(history: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
  """(skipped steps, skipped steps in a row at the end) of a metrics history."""
  flags = [bool(m.get("skipped", False)) for m in history]  # older lines lack the key
  run = len(flags) - max((i + 1 for i, f in enumerate(flags) if not f), default=0)
  return sum(flags), run


def _too_many_skipped(step: int, consecutive: int, m: Mapping[str, Any],
                      config: ConsolidationConfig) -> str:
  steps = f"step {step}" if consecutive == 1 else f"steps {step - consecutive + 1}-{step}"
  limit = config.max_consecutive_skipped_steps
  return (f"consolidation stopped at step {step}: {steps} ({consecutive} in a row) had a "
          f"non-finite loss or gradient norm (last: loss {m['loss']}, grad norm "
          f"{m['grad_norm']}) and were skipped, the train state unchanged; "
          f"ConsolidationConfig.max_consecutive_skipped_steps={limit} allows no more. To let "
          "the run skip more, raise that limit and run again (it resumes from the last "
          "checkpoint); to make the steps finite, look at the learning rate and the models' "
          "weights")


def _default_fingerprint_config() -> dict[str, Any]:
  """The fingerprinted part of the default config, as JSON data."""
  config = ConsolidationConfig().to_dict()
  return json.loads(json.dumps({k: v for k, v in config.items() if k not in RESUMABLE_FIELDS}))


def _with_defaults(old: Any, defaults: Any) -> Any:
  """``old`` (a checkpoint's config) with the keys it lacks taken from ``defaults``, nested.

  A field added to the config after the checkpoint was written takes its default, which keeps
  the earlier behaviour; so such a checkpoint still resumes.
  """
  if not isinstance(old, Mapping) or not isinstance(defaults, Mapping):
    return old
  return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in old.items()}}


class _Checkpoints:
  """Orbax checkpoints of (train state, JSON metadata) in one folder."""

  def __init__(self, folder: str, keep: int):
    self.folder = os.path.abspath(folder)
    policy = getattr(ocp.checkpoint_managers, "LatestN", None)
    keep_option = ({"preservation_policy": policy(n=keep)} if policy is not None
                   else {"max_to_keep": keep})  # orbax < 0.11.x
    self.manager = ocp.CheckpointManager(
        self.folder, options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False, **keep_option))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, meta: Mapping[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_state(self, step: int, abstract: TrainState) -> TrainState:
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]

  def close(self) -> None:
    self.manager.close()


# ---------------------------------------------------------------------------------------------
# The stage.


@dataclasses.dataclass(frozen=True)
class ConsolidationResult:
  """What `run_consolidation` returns."""

  model: Qwen3
  """The consolidated student (a `Qwen3` holding the final weights; shares `state`'s arrays)."""

  metrics: tuple[dict[str, Any], ...]
  """One dict per step, steps 1..`config.steps` in order (also ``workdir/metrics.jsonl``)."""

  state: TrainState
  """The final train state (parameters, optimizer state, step)."""

  resumed_from: int
  """The checkpoint step the run continued from (0: it started fresh)."""

  skipped_steps: int = 0
  """Steps of the round (before a resume too) skipped for a non-finite loss or gradient;
  ``state.step`` counts the optimizer steps taken, ``config.steps - skipped_steps``."""


def _check_knowledge(knowledge: Any) -> tuple[str, ...]:
  if isinstance(knowledge, (str, bytes)):
    raise TypeError("knowledge must be a sequence of texts (the knowledge set), not a single "
                    "string; wrap one text as [text]")
  try:
    texts = tuple(knowledge)
  except TypeError:
    raise TypeError(f"knowledge must be a sequence of str, got {type(knowledge).__name__}"
                    ) from None
  if not texts:
    raise ValueError("the knowledge set is empty: consolidation needs at least one knowledge "
                     "text (run the extraction stage first)")
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"knowledge[{i}] is a {type(t).__name__}, not a str")
  if not any(texts):
    _log.warning("every knowledge text is empty: the teacher sees the same prompt as the "
                    "student, so consolidation only pulls the student toward the round-start "
                    "model")
  return texts


def _check_prefixes(prefixes: Sequence[Prefix]) -> None:
  """Each prefix renders with a knowledge text (a recorded game prompt must be knowledge-free)."""
  for p in prefixes:
    try:
      p.format.messages(p.content, "x")
    except ValueError as e:
      raise ValueError(f"trajectory {p.game}, turn {p.turn}: {e}") from None


def abstract_state(trainer: Trainer, student: Qwen3) -> TrainState:
  """The train state's shapes, dtypes and shardings, without allocating it (for restoring)."""
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(student))
  abstract = TrainState(params=params, opt_state=jax.eval_shape(trainer.tx.init, params),
                        step=jax.ShapeDtypeStruct((), jnp.int32))
  if trainer.mesh is not None:
    shardings = trainer.state_sharding
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _copy_params(params: Any) -> Any:
  # The train step donates the state: the sampler must hold arrays of its own.
  return jax.tree.map(jnp.copy, params)


# ---------------------------------------------------------------------------------------------
# Who samples the replies: the two modes.


@dataclasses.dataclass(frozen=True)
class OnPolicy:
  """The student samples the replies (OEL): the sampler holds its weights, synced after every
  optimizer step that changed them."""

  def prompts(self, inputs: StepInputs) -> tuple[tuple[int, ...], ...]:
    """The prompts the sampler answers: the student's (no knowledge)."""
    return inputs.student_prompts

  def longest_prompt(self, tokenizer: Any, prefix: Prefix, student_ids: Sequence[int],
                     knowledge: Sequence[str], config: ConsolidationConfig) -> int:
    """Tokens of the longest prompt the sampler will be given (``prefix`` is the longest)."""
    del tokenizer, prefix, knowledge, config
    return len(student_ids)

  def start(self, sampler: Any, state: TrainState, teacher_params: Any) -> None:
    """Puts the weights that sample the first step into the sampler."""
    del teacher_params
    sampler.update_weights(_copy_params(state.params))

  def stepped(self, sampler: Any, state: TrainState) -> None:
    """After an optimizer step that was taken (not skipped)."""
    sampler.update_weights(_copy_params(state.params))

  def finish(self, sampler: Any, state: TrainState) -> None:
    """At the end: the sampler holds the final student already."""
    del sampler, state


@dataclasses.dataclass(frozen=True)
class OffPolicy:
  """The knowledge-prompted teacher samples the replies (the paper's off-policy baseline): the
  sampler holds the teacher's weights until the end, then the final student's."""

  def prompts(self, inputs: StepInputs) -> tuple[tuple[int, ...], ...]:
    """The prompts the sampler answers: the teacher's (with knowledge)."""
    return inputs.teacher_prompts

  def longest_prompt(self, tokenizer: Any, prefix: Prefix, student_ids: Sequence[int],
                     knowledge: Sequence[str], config: ConsolidationConfig) -> int:
    """Tokens of the longest prompt: the longest prefix with the longest knowledge text."""
    del student_ids
    widest = max(knowledge, key=len)
    return len(encode_prompt(tokenizer, insert_knowledge(prefix, widest),
                             enable_thinking=config.enable_thinking))

  def start(self, sampler: Any, state: TrainState, teacher_params: Any) -> None:
    """Puts the teacher's weights into the sampler."""
    del state
    sampler.update_weights(teacher_params)

  def stepped(self, sampler: Any, state: TrainState) -> None:
    """The teacher keeps sampling: nothing changes."""
    del sampler, state

  def finish(self, sampler: Any, state: TrainState) -> None:
    """The sampler ends holding the final student, as on-policy."""
    sampler.update_weights(_copy_params(state.params))


POLICIES = {"on_policy": OnPolicy(), "off_policy": OffPolicy()}
"""The sampling strategy of each `ConsolidationConfig.mode`."""


# ---------------------------------------------------------------------------------------------
# The run: inputs checked, a train state restored or made, then steps.


@dataclasses.dataclass(frozen=True)
class _Inputs:
  """A run's data, checked and rendered once."""

  prefixes: list[Prefix]
  """Every turn of every trajectory."""
  games: list[list[int]]
  """Prefix indices per game."""
  knowledge: tuple[str, ...]
  """The context texts."""
  student_ids: dict[int, tuple[int, ...]]
  """Each prefix's student prompt, rendered."""
  longest: int
  """Tokens of the longest prompt the sampler will answer."""
  fingerprint: dict[str, Any]
  """What a checkpoint must match to be resumed from."""


def _check_inputs(student: Qwen3, teacher: Qwen3, trajectories: Any, knowledge: Any,
                  config: Any) -> tuple[list[Prefix], tuple[str, ...]]:
  if not isinstance(config, ConsolidationConfig):
    raise TypeError(f"config must be a ConsolidationConfig, got {type(config).__name__}")
  if isinstance(trajectories, (str, bytes)):
    raise TypeError("trajectories must be a sequence of Trajectory records (read a file with "
                    "oel_jax.envs.load_trajectories)")
  trajectories = list(trajectories)
  if not trajectories:
    raise ValueError("no consolidation trajectories: consolidation needs at least one "
                     "trajectory with a turn")
  prefixes = build_prefixes(trajectories)
  if not prefixes:
    raise ValueError(f"the {len(trajectories)} consolidation trajectories have no turns: "
                     "there is no prefix to train on")
  knowledge = _check_knowledge(knowledge)
  _check_prefixes(prefixes)
  if not isinstance(student, Qwen3) or not isinstance(teacher, Qwen3):
    raise TypeError("student and teacher must be oel_jax.models.Qwen3 models")
  if teacher.config != student.config:
    raise ValueError(f"teacher and student architectures differ: {teacher.config} vs "
                     f"{student.config}")
  return prefixes, knowledge


def _inputs(student: Qwen3, teacher: Qwen3, tokenizer: Any, trajectories: Any, knowledge: Any,
            config: ConsolidationConfig) -> _Inputs:
  """Checks the inputs (raising before any work) and renders the student prompts."""
  prefixes, knowledge = _check_inputs(student, teacher, trajectories, knowledge, config)
  student_ids: dict[int, tuple[int, ...]] = {}
  longest = 0
  for i, p in enumerate(prefixes):
    student_ids[i] = tuple(encode_prompt(tokenizer, p, enable_thinking=config.enable_thinking))
    if len(student_ids[i]) > len(student_ids[longest]):
      longest = i
  need = POLICIES[config.mode].longest_prompt(tokenizer, prefixes[longest], student_ids[longest],
                                              knowledge, config)
  fingerprint = {
      "config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS},
      "model": repr(student.config),
      "prefixes": _prefix_digest(prefixes, student_ids),
      "knowledge": _digest(list(knowledge)),
  }
  return _Inputs(prefixes=prefixes, games=group_by_game(prefixes), knowledge=knowledge,
                 student_ids=student_ids, longest=need,
                 fingerprint=json.loads(json.dumps(fingerprint)))


def _restore(checkpoints: _Checkpoints, fingerprint: Mapping[str, Any],
             config: ConsolidationConfig, abstract: Callable[[], TrainState]
             ) -> tuple[TrainState | None, list[dict[str, Any]], int]:
  """The latest checkpoint's (state, metrics history, step), or (None, [], 0) with none.

  Raises:
    ValueError: the checkpoint is not ours, is of other inputs or settings, or is beyond
      ``config.steps``.
  """
  latest = checkpoints.latest_step()
  if latest is None:
    return None, [], 0
  meta = checkpoints.read_meta(latest)
  if meta.get("kind") != META_KIND or meta.get("version") != META_VERSION:
    raise ValueError(f"{checkpoints.folder}/{latest}: not an oel_jax consolidation checkpoint")
  old_fingerprint = dict(meta["fingerprint"])
  if isinstance(old_fingerprint.get("config"), Mapping):
    old_fingerprint["config"] = _with_defaults(old_fingerprint["config"],
                                               _default_fingerprint_config())
  if old_fingerprint != fingerprint:
    diff = sorted(k for k in fingerprint if old_fingerprint.get(k) != fingerprint[k])
    if "config" in diff:
      old = old_fingerprint["config"]
      diff += [f"config.{k}" for k in fingerprint["config"]
               if old.get(k) != fingerprint["config"][k]]
    raise ValueError(f"{checkpoints.folder} holds a consolidation of other inputs or "
                     f"settings (differing: {', '.join(diff)}); use the same ones to "
                     "resume, or another workdir")
  if latest > config.steps:
    raise ValueError(f"{checkpoints.folder} is at step {latest}, beyond "
                     f"config.steps={config.steps}")
  state = checkpoints.restore_state(latest, abstract())
  _log.info("consolidation: resuming from step %d (%s)", latest, checkpoints.folder)
  return state, [dict(m) for m in meta["metrics"]], latest


@dataclasses.dataclass(frozen=True)
class _StepResult:
  """One step's new state and what its metrics line reports."""

  state: TrainState
  """The train state after the step (unchanged when skipped)."""
  metrics: dict[str, Any]
  """`Trainer.train_step`'s metrics."""
  batch: DistillBatch
  """The step's padded batch."""
  responses: list[list[int]]
  """The sampled replies."""
  reasons: list[str]
  """Their finish reasons."""
  sampling_time: float
  """Seconds spent sampling."""


@dataclasses.dataclass(frozen=True)
class _Stepper:
  """What every step uses: the data, the models' programs and the sampling strategy."""

  inputs: _Inputs
  """The run's data."""
  tokenizer: Any
  """The models' tokenizer."""
  config: ConsolidationConfig
  """The stage's settings."""
  sampler: Any
  """The sampler (weights per `policy`)."""
  trainer: Trainer
  """The train step."""
  teacher_params: Any
  """The frozen teacher's parameters."""
  pad_id: int
  """The padding token."""
  row_multiple: int
  """Rows per batch are a multiple of this (micro-batches x data-parallel devices)."""
  policy: OnPolicy | OffPolicy
  """Who samples the replies."""

  def __call__(self, state: TrainState, step: int) -> _StepResult:
    """Step ``step`` (1-based): sample the replies, build the batch, take the train step."""
    d, config = self.inputs, self.config
    inputs = step_inputs(d.prefixes, d.games, d.knowledge, self.tokenizer, config, step,
                         d.student_ids)

    def answer(chunk: list[tuple[int, ...]], index: int) -> list[tuple[list[int], str]]:
      return engine.replies(self.sampler.generate(
          [list(p) for p in chunk], **config.sampling_params.generate_kwargs(),
          seed=sampling_seed(config.seed, step, index)))

    t0 = time.perf_counter()
    replies = engine.in_chunks(self.policy.prompts(inputs), config.max_sampling_batch, answer)
    sampling_time = time.perf_counter() - t0
    responses = [toks for toks, _ in replies]
    reasons = [reason for _, reason in replies]
    batch = build_batch(inputs.student_prompts, inputs.teacher_prompts, responses,
                        pad_id=self.pad_id, config=config, row_multiple=self.row_multiple)
    state, m = self.trainer.train_step(state, self.teacher_params, batch, skip_non_finite=True)
    if m["finite"]:  # else the weights are as before, the sampler's too
      self.policy.stepped(self.sampler, state)
    return _StepResult(state=state, metrics=m, batch=batch, responses=responses,
                       reasons=reasons, sampling_time=sampling_time)


def _step_line(r: _StepResult, step: int, skipped_steps: int, num_games: int,
               config: ConsolidationConfig, t_step: float) -> dict[str, Any]:
  """The metrics line of a step."""
  m, batch, responses, reasons = r.metrics, r.batch, r.responses, r.reasons
  generated = sum(len(x) for x in responses)
  position = step * config.games_per_step
  line = {
      "step": step,
      "loss": m["loss"], "grad_norm": m["grad_norm"],
      "student_entropy": m["student_entropy"], "teacher_entropy": m["teacher_entropy"],
      "student_topk_mass": m["student_topk_mass"],
      "teacher_topk_mass": m["teacher_topk_mass"],
      "tokens": m["tokens"], "skipped": not m["finite"], "skipped_steps": skipped_steps,
      "rows": len(responses), "padded_rows": int(batch.batch_size),
      "games": config.games_per_step, "epoch": (position - 1) // num_games,
      "games_consumed": position,
      "student_len": int(batch.student_ids.shape[1]),
      "teacher_len": int(batch.teacher_ids.shape[1]),
      "response_len": int(batch.response_mask.shape[1]),
      "mean_response_tokens": generated / len(responses),
      "truncated_fraction": sum(x == "length" for x in reasons) / len(reasons),
      "sampling_time": r.sampling_time, "train_time": m["step_time"],
      "tokens_per_second": m["tokens_per_second"],
      "sampled_tokens_per_second": generated / max(r.sampling_time, 1e-9),
      "step_time": time.perf_counter() - t_step,
  }
  return {k: _json_number(v) for k, v in line.items()}


def _make_trainer(trainer: Trainer | None, student: Qwen3, config: ConsolidationConfig,
                  mesh: jax.sharding.Mesh | None) -> Trainer:
  if trainer is None:
    return Trainer(student, config.train, mesh=mesh)
  if trainer.config != config.train or trainer.model_config != student.config:
    raise ValueError("the trainer given was built for another TrainConfig or architecture "
                     "than config.train and the student's")
  return trainer


def _checkpoints_and_metrics(workdir: str | os.PathLike[str] | None, config: ConsolidationConfig
                             ) -> tuple[_Checkpoints | None, str | None]:
  if workdir is None:
    return None, None
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  return (_Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints),
          os.path.join(workdir, METRICS_FILE))


def run_consolidation(student: Qwen3, teacher: Qwen3, tokenizer: Any,
                      trajectories: Sequence[Trajectory], knowledge: Sequence[str],
                      config: ConsolidationConfig, *, workdir: str | os.PathLike[str] | None = None,
                      mesh: jax.sharding.Mesh | None = None, sampler: Any = None,
                      trainer: Trainer | None = None, progress: bool = True,
                      on_step: Callable[[int, dict[str, Any]], None] | None = None
                      ) -> ConsolidationResult:
  """Consolidates the knowledge into the student by (on-policy) context distillation.

  Args:
    student: the model to train; its own arrays are not modified.
    teacher: the frozen round-start model (may be the same object as ``student``); never
      modified. Must have the student's architecture.
    tokenizer: the models' transformers tokenizer (chat template, stop tokens).
    trajectories: the consolidation trajectories; every turn is a prefix.
    knowledge: the knowledge set C (`oel_jax.experience.load_knowledge_set(...).texts`), or the
      raw-trajectory contexts for ``config.context="raw_trajectories"``.
    config: the stage's settings.
    workdir: folder for checkpoints (``checkpoints/``) and ``metrics.jsonl``; a run there is
      continued from its latest checkpoint. None: nothing is written, no resume.
    mesh: device mesh for the train step (and for a sampler made here); ignored when
      ``trainer`` is given (its own mesh is used).
    sampler: an `oel_jax.sampling.Sampler` of this architecture to reuse (compiled programs);
      its weights are replaced. Made here when None. On return it holds the final weights.
    trainer: an `oel_jax.train.Trainer` of this architecture with ``config.train`` to reuse
      (compiled steps); made here when None.
    progress: show a tqdm progress bar.
    on_step: called as ``on_step(step, metrics)`` after every step (after its checkpoint).

  Returns:
    A `ConsolidationResult`.

  Raises:
    ValueError / TypeError: bad inputs (no trajectories or turns, an empty knowledge set, a
      prompt that already holds knowledge, mismatched models, a checkpoint of another run in
      ``workdir``), before any work.
    oel_jax.train.NonFiniteLossError: ``config.max_consecutive_skipped_steps`` steps in a row
      had a non-finite loss or gradient (each was skipped; the last one's metrics line is
      written, no checkpoint of it; the error's ``.state`` is the unchanged train state).
  """
  data = _inputs(student, teacher, tokenizer, trajectories, knowledge, config)
  trainer = _make_trainer(trainer, student, config, mesh)
  if sampler is not None and data.longest + config.max_new_tokens > getattr(
      sampler, "max_seq_len", math.inf):
    raise ValueError(f"the sampler's max_seq_len ({sampler.max_seq_len}) cannot hold the "
                     f"longest prompt ({data.longest} tokens) plus max_new_tokens "
                     f"({config.max_new_tokens})")
  checkpoints, metrics_path = _checkpoints_and_metrics(workdir, config)
  try:
    state, history, start = None, [], 0
    if checkpoints is not None:
      state, history, start = _restore(checkpoints, data.fingerprint, config,
                                       lambda: abstract_state(trainer, student))
      atomic_write_text(metrics_path, "".join(_metrics_line(m) for m in history))
    if state is None:
      state = trainer.init_state(student)
    if trainer.mesh is None:
      # Committed like a restored state, so that a fresh and a resumed run share one compiled
      # step (jit keys its programs on whether the arguments are committed to a device).
      state = jax.device_put(state, jax.devices()[0])
    stepper = _stepper(data, tokenizer, config, sampler, trainer, teacher, state)
    stepper.policy.start(stepper.sampler, state, stepper.teacher_params)
    state, history = _run_steps(stepper, state, history, start, checkpoints, metrics_path,
                                progress, on_step)
  finally:
    if checkpoints is not None:
      checkpoints.close()
  stepper.policy.finish(stepper.sampler, state)
  return ConsolidationResult(model=trainer.student(state), metrics=tuple(history), state=state,
                             resumed_from=start, skipped_steps=_skip_counts(history)[0])


def _stepper(data: _Inputs, tokenizer: Any, config: ConsolidationConfig, sampler: Any,
             trainer: Trainer, teacher: Qwen3, state: TrainState) -> _Stepper:
  """The step function of a run; makes the sampler when none was given."""
  stop_ids = chat.stop_token_ids(tokenizer)
  pad_id = stop_ids[0] if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
  row_multiple = config.train.micro_batches
  if trainer.mesh is not None:
    row_multiple *= trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
  teacher_params = trainer.teacher_params(teacher)
  if sampler is None:
    # Built on the train state's arrays, so its weights sit where the trainer's do (on the
    # mesh); the policy's start replaces them by copies.
    sampler = Sampler(trainer.student(state), eos_ids=stop_ids, pad_id=pad_id,
                      max_seq_len=bucket_size(data.longest + 64) + config.max_new_tokens,
                      mesh=trainer.mesh)
  return _Stepper(inputs=data, tokenizer=tokenizer, config=config, sampler=sampler,
                  trainer=trainer, teacher_params=teacher_params, pad_id=pad_id,
                  row_multiple=row_multiple, policy=POLICIES[config.mode])


def _run_steps(stepper: _Stepper, state: TrainState, history: list[dict[str, Any]], start: int,
               checkpoints: _Checkpoints | None, metrics_path: str | None, progress: bool,
               on_step: Callable[[int, dict[str, Any]], None] | None
               ) -> tuple[TrainState, list[dict[str, Any]]]:
  """Steps ``start + 1 .. config.steps``: each one's metrics line, checkpoint and callback."""
  config = stepper.config
  skipped_steps, consecutive = _skip_counts(history)
  bar = tqdm(total=config.steps, initial=start, unit="step", desc="consolidate",
             disable=not progress, leave=False)
  try:
    for step in range(start + 1, config.steps + 1):
      t_step = time.perf_counter()
      result = stepper(state, step)
      state, m = result.state, result.metrics
      if m["finite"]:
        consecutive = 0
      else:
        skipped_steps += 1
        consecutive += 1
        _log.warning(
            "consolidation step %d skipped: non-finite loss %s / grad norm %s; the train "
            "state is unchanged (%d skipped in a row, %d this round; the round stops at %d "
            "in a row)", step, m["loss"], m["grad_norm"], consecutive, skipped_steps,
            config.max_consecutive_skipped_steps)
      line = _step_line(result, step, skipped_steps, len(stepper.inputs.games), config, t_step)
      history.append(line)
      if metrics_path is not None:
        with open(metrics_path, "a", encoding="utf-8") as f:
          f.write(_metrics_line(line))
      if consecutive >= config.max_consecutive_skipped_steps:
        # Before the checkpoint: running again resumes before these steps and meets them
        # again, unless the limit was raised.
        raise NonFiniteLossError(_too_many_skipped(step, consecutive, m, config), state)
      if checkpoints is not None and (step == config.steps or (
          config.checkpoint_every and step % config.checkpoint_every == 0)):
        checkpoints.save(step, state, {
            "kind": META_KIND, "version": META_VERSION, "step": step,
            "games_consumed": step * config.games_per_step, "seed": config.seed,
            "fingerprint": stepper.inputs.fingerprint, "metrics": history})
      bar.update(1)
      bar.set_postfix(loss="skipped" if not m["finite"] else f"{m['loss']:.4g}",
                      tok_s=f"{m['tokens_per_second']:.0f}")
      if on_step is not None:
        on_step(step, dict(line))
  finally:
    bar.close()
  return state, history
