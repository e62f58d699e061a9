"""Batched multi-turn rollouts: many games played at once, in lockstep, by one sampler.

    trajectories = rollout(sampler, tokenizer, game_seeds("train", 0, round_, 64),
                           RolloutConfig(env="frozenlake"), model=ModelInfo("Qwen/Qwen3-4B", 1),
                           path="runs/round1/train.jsonl")

Every turn, the observation history of each game still running is rendered by a prompt format
(`oel_jax.prompts.formats`; the paper's game prompt, one user message, by default) and the
tokenizer's own chat template (thinking on or off), and all of them go to the sampler in **one**
batched `generate` call (or in chunks of `RolloutConfig.max_batch_size`). Each reply is decoded
(special tokens dropped), optionally stripped of its reasoning, and played in its game; games
that end leave the batch. This is the official implementation's loop (microsoft/LMOps,
``oel/verl/verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py``,
``generate_sequences_textgame``), with our `oel_jax.envs` games in place of its TextArena calls.

Reasoning (``keep_reasoning``), as the official ``_postprocess_textgame_response`` does it:

- kept (the default, and what every official script uses): the decoded reply is recorded and
  played as it is;
- stripped: the text after the last ``</think>`` (not whitespace-stripped) is recorded and
  played; a reply with no ``</think>`` becomes `FORMAT_ERROR_RESPONSE`, which holds no action,
  so the game sees an invalid move. The reasoning is not recorded anywhere in that mode.

Per turn, ``Turn.metadata`` holds ``prompt_tokens`` (the templated prompt's length),
``response_tokens`` (tokens generated, the stop token not counted) and ``finish_reason``
(``"stop"``: the model ended its turn; ``"length"``: cut at ``max_new_tokens``).
``response_tokens`` counts every generated token, reasoning included, in both modes.

Seeds. Board seeds come from `game_seeds` (training and held-out evaluation sets that never
overlap). Sampling randomness comes from `RolloutConfig.seed`: game ``g``'s reply at turn
``t`` is sampled with its own seed derived from ``(seed, board seed of g, play of g, t)``
(`game_turn_seed`), passed to the sampler one per prompt. A game's replies therefore depend
only on its board, its play index, the turn and the sampling seed: not on which other games
share the call, on its row in the batch, or on how ``max_batch_size`` splits the calls. The
play index tells apart several plays of one board in one call (the K extraction plays of a
board, which the official code runs as K jobs with K rollout seeds): without it they would be
one game K times.

With ``RolloutConfig.slots`` (and a sampler that supports it), `rollout` plays the same
games with continuous batching instead (`oel_jax.envs.continuous`): each reply is played as
soon as it ends and its game's next turn takes its row, with the same seeds and trajectories.

(This module is ``lockstep``, not ``rollout``, so that ``oel_jax.envs.rollout`` is the function.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from oel_jax import chat, engine, settings
from oel_jax.envs.textarena_games import GAMES, make_env
from oel_jax.envs.trajectory import ModelInfo, Trajectory, write_trajectories
from oel_jax.prompts import formats

FORMAT_ERROR_RESPONSE = "Format error: no </think> found in the response"
"""What replaces a reply with no ``</think>`` when reasoning is stripped (official text)."""

GAMES_PER_ROUND = 1_000_000
"""Most games one `game_seeds` set (one split, base seed and round) can hold."""

MAX_ROUNDS = 1_000
"""Rounds per base seed that `game_seeds` keeps apart (``round`` is in [0, MAX_ROUNDS))."""

SPLITS = ("train", "eval")


def game_seeds(split: str, base_seed: int, round_: int, n: int, start: int = 0) -> list[int]:
  """Board seeds for ``n`` games: a training set per round, or the fixed held-out set.

  The scheme: with ``block = base_seed * MAX_ROUNDS + r``, where ``r = round_`` for
  ``"train"`` and ``r = 0`` for ``"eval"``, game ``i`` gets

      seed = 2 * (block * GAMES_PER_ROUND + start + i) + (1 if split == "train" else 0)

  so that

  - evaluation seeds are even and training seeds odd: the two sets never overlap, whatever the
    base seeds and rounds;
  - evaluation seeds do not depend on the round (the held-out maps stay fixed across rounds);
  - training seeds of different rounds (or base seeds) never overlap;
  - ``start`` selects further games of the same set (e.g. the extraction games first, then the
    consolidation games: ``game_seeds("train", b, r, n2, start=n1)``).

  (Seeds differ; boards may still repeat: 3x3 FrozenLake with a fixed start and goal has only
  a few dozen distinct maps.)

  Args:
    split: ``"train"`` or ``"eval"``.
    base_seed: the experiment's seed, >= 0.
    round_: the OEL round, in [0, MAX_ROUNDS); ignored for ``"eval"``.
    n: how many seeds.
    start: index of the first game in the set; ``start + n <= GAMES_PER_ROUND``.

  Returns:
    ``n`` distinct non-negative seeds, in game order.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  for name, value in (("base_seed", base_seed), ("round_", round_), ("n", n), ("start", start)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
  if round_ >= MAX_ROUNDS:
    raise ValueError(f"round_ must be < MAX_ROUNDS={MAX_ROUNDS}, got {round_}")
  if start + n > GAMES_PER_ROUND:
    raise ValueError(f"start + n = {start + n} exceeds GAMES_PER_ROUND={GAMES_PER_ROUND}")
  train = split == "train"
  block = int(base_seed) * MAX_ROUNDS + (int(round_) if train else 0)
  first = block * GAMES_PER_ROUND + int(start)
  return [2 * (first + i) + int(train) for i in range(int(n))]


def strip_reasoning(text: str) -> str:
  """The reply as played when reasoning is stripped (official ``keep_reasoning=False``).

  The text after the last ``</think>``, as it is (leading newlines kept); with no
  ``</think>``, `FORMAT_ERROR_RESPONSE`.
  """
  answer = chat.after_reasoning(text)
  return FORMAT_ERROR_RESPONSE if answer is None else answer


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How a batch of games is played. Defaults: the official deployment rollouts."""

  env: str = settings.choice("frozenlake", GAMES)
  """The game, a name `oel_jax.envs.make_env` knows (``"frozenlake"``, ``"sokoban"``)."""

  env_settings: Mapping[str, Any] = settings.mapping()
  """Overrides of the game's settings (`make_env` keywords); empty = the paper's settings."""

  enable_thinking: bool = settings.boolean(True)
  """Passed to the chat template: Qwen3 thinking mode on (the model reasons in
  ``<think>...</think>`` first) or off (an empty think block is pre-filled). The official
  ``textgame_no_think`` is its negation. Templates without the flag ignore it."""

  keep_reasoning: bool = settings.boolean(True)
  """Whether the reasoning before ``</think>`` stays in the reply that is recorded and parsed
  (True, as in every official script), or is stripped (see `strip_reasoning`)."""

  max_new_tokens: int = settings.max_new_tokens(1024)
  """Token budget of one reply (reasoning included); the paper uses 1024."""

  temperature: float = settings.temperature(0.7)
  """Sampling temperature (0 = greedy). Official deployment rollouts: 0.7."""

  top_k: int = settings.top_k(0)
  """Keep only the k most likely tokens (0 = off). Official deployment rollouts: off."""

  top_p: float = settings.top_p(1.0)
  """Nucleus sampling mass in (0, 1] (1 = off). Official deployment rollouts: 1."""

  seed: int = settings.integer(0, minimum=0)
  """Sampling seed (>= 0): with the same board seeds and config, the same trajectories."""

  max_batch_size: int | None = settings.integer(None, minimum=1, optional=True)
  """Most prompts per `generate` call; more active games are split into several calls per
  turn. None: all active games in one call."""

  slots: int | None = settings.integer(None, minimum=1, optional=True)
  """Continuous batching: decode this many replies at once, and as soon as one ends, play it
  and prefill its game's next turn (or the next game) into its row while the others keep
  decoding (`oel_jax.envs.continuous`), instead of one `generate` call per turn that waits
  for its longest reply. The same trajectories. Needs a sampler that supports slots (a
  `Sampler`, on one device or a mesh); other samplers, and rollouts that share a knowledge
  prefix, play in lockstep. None: lockstep."""

  progress: bool = settings.boolean(True)
  """Show a tqdm progress bar (games finished, current turn, games still running)."""

  def __post_init__(self):
    object.__setattr__(self, "env_settings", dict(self.env_settings))
    settings.check(self)

  @property
  def sampling_params(self) -> settings.SamplingParams:
    """The settings of each sampler call."""
    return settings.SamplingParams.of(self)

  def sampling(self) -> dict[str, Any]:
    """The sampling settings as JSON data (recorded in each trajectory's metadata)."""
    return {"temperature": float(self.temperature), "top_k": int(self.top_k),
            "top_p": float(self.top_p), "max_new_tokens": int(self.max_new_tokens),
            "seed": int(self.seed)}


def _bad_int(value: Any, minimum: int) -> bool:
  return isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum


def game_turn_seed(seed: int, board_seed: int, turn: int, play: int = 0) -> int:
  """The sampler seed, in [0, 2^64), of one game's reply at ``turn`` under sampling ``seed``.

  ``play`` numbers the plays of one board (0, 1, ...): each play is its own game.
  """
  return int(np.random.SeedSequence([int(seed), int(board_seed), int(play), int(turn)])
             .generate_state(1, np.uint64)[0])


def _encode_turn(tokenizer: Any, messages: list[formats.Message], config: RolloutConfig,
                 max_seq_len: int | None, where: str) -> list[int]:
  """One turn's prompt ids; raises when they and the reply budget overflow the sampler."""
  ids = chat.encode_chat(tokenizer, messages, enable_thinking=config.enable_thinking)
  if max_seq_len is not None and len(ids) + config.max_new_tokens > max_seq_len:
    raise ValueError(
        f"{where}: the prompt has {len(ids)} tokens; with max_new_tokens="
        f"{config.max_new_tokens} it exceeds the sampler's max_seq_len={max_seq_len} (the "
        "official code allows 512 prompt tokens per turn plus the knowledge)")
  return ids


def _sample_turn(sampler: engine.TokenSampler, requests: list[tuple[int, list[int]]],
                 config: RolloutConfig, share_prefix: bool = False
                 ) -> tuple[list[tuple[list[int], str]], int]:
  """``(tokens, finish_reason)`` per ``(seed, prompt ids)`` request, and the calls made."""
  kwargs = config.sampling_params.generate_kwargs()
  if share_prefix and getattr(sampler, "shares_prefixes", False):
    kwargs["share_prefix"] = True
  calls = 0

  def answer(chunk: list[tuple[int, list[int]]], _: int) -> list[tuple[list[int], str]]:
    nonlocal calls
    calls += 1
    return engine.replies(sampler.generate([ids for _, ids in chunk], **kwargs,
                                           seed=[seed for seed, _ in chunk]))

  return engine.in_chunks(requests, config.max_batch_size, answer), calls


def _record(trajectory: Trajectory, metas: Sequence[Mapping[str, Any]], contents: Sequence[str],
            prompt_format: formats.PromptFormat, knowledge: str | None) -> Trajectory:
  """The played trajectory with each turn's metadata, content, format and rendered prompt."""
  turns = tuple(dataclasses.replace(
      turn, metadata=meta, content=text, prompt_format=prompt_format.id,
      prompt=formats.user_text(prompt_format.messages(text, knowledge)))
                for turn, meta, text in zip(trajectory.turns, metas, contents))
  return dataclasses.replace(trajectory, turns=turns)


def _checked_games(model: Any, seeds: Sequence[int],
                   plays: Sequence[int] | None) -> tuple[list[int], list[int]]:
  """The board seed and play index of each game, as ints; raises on a bad model or play."""
  if not isinstance(model, ModelInfo):
    raise TypeError(f"model must be a ModelInfo, got {type(model).__name__}")
  seeds = [int(s) for s in seeds]
  plays = [0] * len(seeds) if plays is None else list(plays)
  if len(plays) != len(seeds) or any(_bad_int(p, 0) for p in plays):
    raise ValueError(f"plays must hold one integer >= 0 per seed ({len(seeds)} seeds), got "
                     f"{plays!r}")
  return seeds, [int(p) for p in plays]


@dataclasses.dataclass
class _Games:
  """One rollout's games as they are played: per game, what each turn showed and cost."""

  envs: list[Any]
  """The games (`oel_jax.envs.Environment`), in the order of the seeds."""
  seeds: list[int]
  """Each game's board seed."""
  plays: list[int]
  """Each game's play index."""
  turn_meta: list[list[dict[str, Any]]] = dataclasses.field(init=False)
  """Per game, each turn's ``Turn.metadata``."""
  contents: list[list[str]] = dataclasses.field(init=False)
  """Per game, the observation history each turn showed."""
  turns: int = 0
  """Turns played so far (by the longest game)."""
  generate_s: float = 0.0
  """Seconds spent in sampler calls."""
  calls: int = 0
  """Sampler calls made."""

  def __post_init__(self):
    self.turn_meta = [[] for _ in self.envs]
    self.contents = [[] for _ in self.envs]

  def timings(self, wall: float) -> dict[str, float]:
    """What `rollout` reports in ``timings``, ``wall`` seconds after it started."""
    return {"generate_s": self.generate_s, "other_s": wall - self.generate_s, "wall_s": wall,
            "turns": float(self.turns), "calls": float(self.calls)}


def _play(games: _Games, sampler: engine.TokenSampler, tokenizer: Any, config: RolloutConfig,
          knowledge: str | None, prompt_format: formats.PromptFormat,
          share_prefix: bool = False) -> None:
  """Resets the games and plays them in lockstep, one turn of every running game at a time."""
  for env in games.envs:
    env.reset()
  active = list(range(len(games.envs)))
  bar = tqdm(total=len(games.envs), unit="game", desc=f"{config.env} rollout",
             disable=not config.progress, leave=False)
  try:
    while active:
      bar.set_postfix(turn=games.turns, running=len(active))
      _play_turn(games, active, sampler, tokenizer, config, knowledge, prompt_format,
                 share_prefix)
      still = [i for i in active if not games.envs[i].done]
      bar.update(len(active) - len(still))
      active = still
      games.turns += 1
  finally:
    bar.close()


def _play_turn(games: _Games, active: list[int], sampler: engine.TokenSampler, tokenizer: Any,
               config: RolloutConfig, knowledge: str | None,
               prompt_format: formats.PromptFormat, share_prefix: bool = False) -> None:
  """One turn of the ``active`` games: their prompts in one sampling pass, each reply played."""
  max_seq_len = getattr(sampler, "max_seq_len", None)
  requests = [next_turn(games, i, tokenizer, config, knowledge, prompt_format, max_seq_len)
              for i in active]
  t0 = time.perf_counter()
  replies, calls = _sample_turn(sampler, requests, config, share_prefix)
  games.generate_s += time.perf_counter() - t0
  games.calls += calls
  for i, (_, ids), (toks, reason) in zip(active, requests, replies):
    play_reply(games, i, ids, toks, reason, tokenizer, config)


def next_turn(games: _Games, i: int, tokenizer: Any, config: RolloutConfig,
              knowledge: str | None, prompt_format: formats.PromptFormat,
              max_seq_len: int | None) -> tuple[int, list[int]]:
  """Game ``i``'s next turn as a sampler request: ``(seed, prompt ids)``; its observation
  history is recorded as the turn's content."""
  turn = len(games.turn_meta[i])
  games.contents[i].append(games.envs[i].history)
  messages = prompt_format.messages(games.contents[i][-1], knowledge)
  ids = _encode_turn(tokenizer, messages, config, max_seq_len,
                     f"game {i} (seed {games.seeds[i]}), turn {turn}")
  return game_turn_seed(config.seed, games.seeds[i], turn, games.plays[i]), ids


def play_reply(games: _Games, i: int, ids: list[int], toks: list[int], reason: str,
               tokenizer: Any, config: RolloutConfig) -> None:
  """Plays a reply (generated ids ``toks``, finished for ``reason``) to prompt ``ids`` in game
  ``i`` and records the turn's metadata."""
  text = tokenizer.decode(toks, skip_special_tokens=True)
  games.envs[i].step(text if config.keep_reasoning else strip_reasoning(text))
  games.turn_meta[i].append({"prompt_tokens": len(ids),
                             "response_tokens": len(toks) - int(reason == "stop"),
                             "finish_reason": reason})


def uses_slots(sampler: engine.TokenSampler, config: RolloutConfig,
               share_prefix: bool = False) -> bool:
  """Whether `rollout` plays with continuous batching (`RolloutConfig.slots`): asked for,
  offered by the sampler (``supports_slots``), and no shared prefix asked for (its one
  prefill per call is worth more than slots when a knowledge text is in every prompt)."""
  return (config.slots is not None and bool(getattr(sampler, "supports_slots", False))
          and not share_prefix)


def rollout(sampler: engine.TokenSampler, tokenizer: Any, seeds: Sequence[int],
            config: RolloutConfig = RolloutConfig(), *, model: ModelInfo,
            knowledge: str | None = None, path: str | None = None,
            metadata: Mapping[str, Any] | None = None,
            timings: dict[str, float] | None = None,
            plays: Sequence[int] | None = None,
            prompt_format: formats.PromptFormat = formats.GAME,
            share_prefix: bool = False) -> list[Trajectory]:
  """Plays one game per board seed, all at once, and returns their trajectories.

  In lockstep (one sampler call per turn of every running game) by default; with
  continuous batching when ``config.slots`` is set and the sampler supports it (`uses_slots`;
  `oel_jax.envs.continuous`). Both give the same trajectories.

  Args:
    sampler: a `oel_jax.sampling.Sampler` (or any `oel_jax.engine.TokenSampler`).
    tokenizer: the model's transformers tokenizer (its chat template renders the prompts).
    seeds: board seeds, one game each (see `game_seeds`).
    config: how to play.
    model: recorded in every trajectory (name and OEL round of the deployed model).
    knowledge: experiential knowledge shown in every prompt (paper Fig. 12); None or "" for
      none (the prompts recorded then carry no knowledge block).
    path: if given, the trajectories are also written there as a JSONL file (atomically:
      complete or not at all).
    metadata: extra JSON data merged into every trajectory's metadata (e.g. ``{"split":
      "train"}``).
    timings: if given, filled with ``generate_s`` (time in sampler calls), ``other_s`` (the
      rest: environments, templating, decoding), ``wall_s`` (both; not the file write),
      ``turns`` and ``calls`` (`generate` calls in lockstep; decode chunks with slots).
    plays: the play index of each game (>= 0, one per seed; None: all 0). Plays of one board
      with different indices are different games (their sampling seeds differ); the index is
      recorded in each trajectory's metadata as ``play``.
    prompt_format: renders each turn's messages from the game's observation history and
      ``knowledge`` (default: the paper's game prompt); each turn records its id, the history
      as ``content`` and the user message as ``prompt``.
    share_prefix: ask a sampler that offers it (``shares_prefixes``; see
      `oel_jax.engine.TokenSampler`) to prefill the prefix common to a call's prompts once
      (worth it when one knowledge text is in every prompt). The replies do not change.

  Returns:
    The trajectories, in the order of ``seeds``. Each one's metadata holds ``sampling``
    (`RolloutConfig.sampling`), ``enable_thinking``, ``keep_reasoning`` and
    ``with_knowledge``, plus ``metadata`` and ``play``.

  Raises:
    ValueError: a prompt plus ``max_new_tokens`` does not fit the sampler's ``max_seq_len``
      (named by game, seed and turn), the sampler returned the wrong number of replies, or
      ``plays`` does not hold one non-negative integer per seed.
  """
  seeds, plays = _checked_games(model, seeds, plays)
  wall_start = time.perf_counter()
  games = _Games([make_env(config.env, seed=s, knowledge=knowledge, **config.env_settings)
                  for s in seeds], seeds, plays)
  if uses_slots(sampler, config, share_prefix):
    # Imported here: `continuous` builds on this module's helpers.
    from oel_jax.envs import continuous  # pylint: disable=import-outside-toplevel
    continuous.play(games, sampler, tokenizer, config, knowledge, prompt_format)
  else:
    _play(games, sampler, tokenizer, config, knowledge, prompt_format, share_prefix)
  extra = {"sampling": config.sampling(), "enable_thinking": config.enable_thinking,
           "keep_reasoning": config.keep_reasoning, "with_knowledge": bool(knowledge),
           **dict(metadata or {})}
  trajectories = [
      _record(env.trajectory(model, metadata={**extra, "play": play}), metas, texts,
              prompt_format, knowledge)
      for env, metas, texts, play in zip(games.envs, games.turn_meta, games.contents, plays)]
  if timings is not None:
    timings.update(games.timings(time.perf_counter() - wall_start))
  if path is not None:
    write_trajectories(path, trajectories)
  return trajectories
