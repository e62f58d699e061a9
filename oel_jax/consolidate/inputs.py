"""Prefixes and per-step data: which turns a step trains on and the prompts both models see.

Every random choice of step ``s`` (which games, which turns, which knowledge text per row, the
sampling seed) is a function of ``(config.seed, s)`` alone. The teacher's prompt is the
prefix with a knowledge text, rendered by the prefix's prompt format (`insert_knowledge`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from oel_jax import chat, experience
from oel_jax.consolidate.config import ConsolidationConfig
from oel_jax.envs import Trajectory, Turn
from oel_jax.prompts import formats
from oel_jax.sampling import bucket_size
from oel_jax.teacher_prefix import knowledge_prefix_ids, split_prompts
from oel_jax.train import DistillBatch, make_batch

# Tags that keep the random streams of one step apart.
_ORDER, _TURNS, _CONTEXT, _SAMPLE = 1, 2, 3, 4


def _seed(*parts: int) -> np.random.SeedSequence:
  return np.random.SeedSequence([int(p) for p in parts])


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


def teacher_prefix(prefix: Prefix, knowledge: str | None) -> Prefix:
  """The teacher's prefix: ``oel_jax.consolidate.insert_knowledge(prefix, knowledge)``.

  Looked up on the package at each call, so that replacing that attribute changes every
  teacher prompt of a run (``scripts/demo_failure_checks.py``'s ``stale_teacher`` break).
  """
  return sys.modules[__package__].insert_knowledge(prefix, knowledge)


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


def encode_prompt(tokenizer: Any, prompt: Prefix | str, *, enable_thinking: bool) -> list[int]:
  """A prefix's messages (or one user message's text) through the chat template, as token ids."""
  messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
              else prompt.messages())
  return chat.encode_chat(tokenizer, messages, enable_thinking=enable_thinking)


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
    teacher.append(tuple(encode_prompt(tokenizer, teacher_prefix(prefixes[i], knowledge[c]),
                                       enable_thinking=config.enable_thinking)))
  return StepInputs(step=step, prefixes=tuple(rows), contexts=tuple(contexts),
                    student_prompts=tuple(student), teacher_prompts=tuple(teacher))


def teacher_prefix_ids(prefixes: Sequence[Prefix], knowledge: Sequence[str], tokenizer: Any,
                       config: ConsolidationConfig) -> list[list[int]]:
  """Per knowledge text, the token ids every teacher prompt drawing it starts with (up to the
  tokenizer's boundary at the end; `oel_jax.teacher_prefix.knowledge_prefix_ids`): the chat
  template's opening and whatever the prompt format puts before the per-row content."""
  render = lambda p, text: chat.render_chat(tokenizer, teacher_prefix(p, text).messages(),
                                            enable_thinking=config.enable_thinking)
  encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))
  return knowledge_prefix_ids(render, encode, prefixes, knowledge)


def build_batch(student_prompts: Sequence[Sequence[int]], teacher_prompts: Sequence[Sequence[int]],
                responses: Sequence[Sequence[int]], *, pad_id: int, config: ConsolidationConfig,
                row_multiple: int = 1, contexts: Sequence[int] | None = None,
                prefix_ids: Sequence[Sequence[int]] | None = None) -> DistillBatch:
  """The `DistillBatch` of one step, its rows and lengths padded up to buckets.

  Row i is ``student_prompts[i] + responses[i]`` / ``teacher_prompts[i] + responses[i]``, every
  response token scored. Padding rows (a single pad token each) have no scored token.

  With ``prefix_ids`` (per knowledge text, the token ids of the teacher's cached prefix) and
  ``contexts`` (row i's knowledge text), each teacher row holds only what follows the part of
  its text's prefix it starts with (`oel_jax.train.with_teacher_prefix`), and the teacher's
  length bucket is that of those rests.
  """
  if (contexts is None) != (prefix_ids is None):
    raise ValueError("build_batch: give contexts and prefix_ids together (or neither)")
  b = len(responses)
  rows = bucket_size(b, config.min_row_bucket, config.length_buckets_per_doubling, row_multiple)
  used: list[int] = []
  if prefix_ids is not None:
    teacher_prompts, used = split_prompts(teacher_prompts, contexts, prefix_ids)
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
  if prefix_ids is not None:  # padding rows: no cached token, text 0
    batch = batch.replace(
        teacher_context=jnp.asarray(np.asarray(list(contexts) + [0] * (rows - b), np.int32)),
        teacher_prefix_len=jnp.asarray(np.asarray(used + [0] * (rows - b), np.int32)))
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
