"""Pass-rate evaluation on held-out maps (arXiv:2603.16856 section 4; DESIGN.md section 5.1).

    result = evaluate(sampler, tokenizer, EvalConfig(env="frozenlake"),
                      model=ModelInfo("Qwen/Qwen3-4B", round=2))
    print(result.pass_rate_mean, result.pass_rate_std, result.mean_response_tokens)
    json.dumps(result.to_dict())

The model plays the same `num_games` held-out maps (``game_seeds("eval", base_seed, ...)``:
fixed across rounds, disjoint from every training seed) once per sampling seed, with the
paper's evaluation sampling (temperature 0.7, top-p 0.8, top-k 20; the official
``val_kwargs``). Passing ``knowledge`` puts a knowledge text in every prompt (the paper's
"in-context" columns).

Metrics, as the official ``_validate_textgame`` defines them (microsoft/LMOps,
``oel/verl/verl/trainer/ppo/ray_trainer.py``), per sampling seed:

- pass rate: share of games whose reward equals 1 (``Outcome.success``);
- mean response length: the mean over every turn of every game of the reply's length in
  tokens. Ours counts the tokens the sampler generated (stop token excluded; reasoning
  included). The official code re-tokenises the recorded reply text, which gives the same
  count when reasoning is kept (its scripts all keep it), but counts only the answer when
  reasoning is stripped; ours measures what generation cost in both modes;
- turns per game: the mean number of model calls per game.

Over seeds: the mean, the sample standard deviation (``ddof=1``; 0 with one seed), and the
minimum and maximum of the per-seed pass rates; response length and turns pooled over all
turns (games) of all seeds. The official evaluation script plays the 128 maps once
(``held_out_rollout=1``) with the vLLM seed set per run; we repeat over `sampling_seeds`
with the maps fixed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from oel_jax import settings
from oel_jax.engine import TokenSampler
from oel_jax.envs.lockstep import RolloutConfig, game_seeds, rollout
from oel_jax.envs.textarena_games import GAMES
from oel_jax.envs.trajectory import ModelInfo, Trajectory, write_trajectories


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate on and how to sample. Defaults: the paper's evaluation."""

  env: str = settings.choice("frozenlake", GAMES)
  """The game (``"frozenlake"`` or ``"sokoban"``)."""

  env_settings: Mapping[str, Any] = settings.mapping()
  """Overrides of the game's settings; empty = the paper's settings."""

  num_games: int = settings.integer(128, minimum=1)
  """Held-out maps per sampling seed (the paper: 128)."""

  base_seed: int = settings.integer(0, minimum=0)
  """Selects the held-out set: ``game_seeds("eval", base_seed, 0, num_games)``."""

  sampling_seeds: tuple[int, ...] = settings.seeds(range(10))
  """One full pass over the maps per seed; the pass rate's spread is taken over them (the
  paper's protocol: 10 seeds)."""

  temperature: float = settings.temperature(0.7)
  """Sampling temperature (paper and official ``val_kwargs``: 0.7)."""

  top_k: int = settings.top_k(20)
  """Top-k (paper: 20)."""

  top_p: float = settings.top_p(0.8)
  """Top-p (paper: 0.8)."""

  max_new_tokens: int = settings.max_new_tokens(1024)
  """Token budget of one reply, reasoning included (paper: 1024)."""

  enable_thinking: bool = settings.boolean(True)
  """Chat-template thinking mode (see `RolloutConfig.enable_thinking`)."""

  keep_reasoning: bool = settings.boolean(True)
  """Keep the reasoning in the reply that is parsed (official evaluation: kept)."""

  max_batch_size: int | None = settings.integer(None, minimum=1, optional=True)
  """Most prompts per sampler call (None: every running game at once)."""

  progress: bool = settings.boolean(True)
  """Show progress bars."""

  def __post_init__(self):
    object.__setattr__(self, "env_settings", dict(self.env_settings))
    if isinstance(self.sampling_seeds, (list, range)):
      object.__setattr__(self, "sampling_seeds", tuple(self.sampling_seeds))
    settings.check(self)

  def rollout_config(self, seed: int) -> RolloutConfig:
    """The rollout settings of the pass with sampling seed ``seed``."""
    return RolloutConfig(
        env=self.env, env_settings=self.env_settings, enable_thinking=self.enable_thinking,
        keep_reasoning=self.keep_reasoning, max_new_tokens=self.max_new_tokens,
        temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed,
        max_batch_size=self.max_batch_size, progress=self.progress)

  def game_seeds(self) -> list[int]:
    """The held-out board seeds."""
    return game_seeds("eval", self.base_seed, 0, self.num_games)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Evaluation metrics over several sampling seeds (see the module docstring)."""

  env: str
  """The game."""

  num_games: int
  """Games per sampling seed."""

  sampling_seeds: tuple[int, ...]
  """The sampling seeds, in the order of the per-seed fields."""

  with_knowledge: bool
  """Whether a knowledge text was in context (the paper's "in-context" setting)."""

  pass_rates: tuple[float, ...]
  """Per seed: share of games passed (reward 1)."""

  pass_rate_mean: float
  """Mean of `pass_rates`."""

  pass_rate_std: float
  """Sample standard deviation of `pass_rates` (ddof=1; 0.0 with a single seed)."""

  pass_rate_min: float
  """Lowest of `pass_rates`."""

  pass_rate_max: float
  """Highest of `pass_rates`."""

  mean_response_tokens: float
  """Mean generated tokens per turn (stop token excluded), over every turn of every seed."""

  mean_response_tokens_per_seed: tuple[float, ...]
  """The same, per seed."""

  mean_turns: float
  """Mean turns (model calls) per game, over every game of every seed."""

  mean_turns_per_seed: tuple[float, ...]
  """The same, per seed."""

  truncated_fraction: float
  """Share of turns cut at ``max_new_tokens`` (finish reason ``"length"``), over all seeds."""

  def to_dict(self) -> dict[str, Any]:
    """The result as JSON data (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}


def _mean(values: Sequence[float]) -> float:
  return math.fsum(values) / len(values) if values else 0.0


def _turn_stats(trajectories: Sequence[Trajectory]) -> tuple[list[int], list[bool]]:
  """(response tokens, truncated?) of every turn; each turn must carry rollout metadata."""
  tokens, truncated = [], []
  for g, t in enumerate(trajectories):
    for k, turn in enumerate(t.turns):
      n = turn.metadata.get("response_tokens")
      if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"trajectory {g} (seed {t.seed}) turn {k}: metadata has no integer "
                         "'response_tokens' (was it recorded by oel_jax.envs.rollout()?)")
      tokens.append(n)
      truncated.append(turn.metadata.get("finish_reason") == "length")
  return tokens, truncated


def summarize(runs: Mapping[int, Sequence[Trajectory]], *,
              with_knowledge: bool = False) -> EvalResult:
  """Computes the metrics from finished games, one run (list of games) per sampling seed.

  Raises:
    ValueError: no runs, an empty run, runs of different sizes or games, a game without an
      outcome, or a turn without ``response_tokens`` metadata.
  """
  if not runs:
    raise ValueError("summarize needs at least one run")
  seeds = tuple(int(s) for s in runs)
  sizes = {len(games) for games in runs.values()}
  if len(sizes) != 1 or 0 in sizes:
    raise ValueError(f"every run must hold the same, non-zero number of games; got "
                     f"{ {s: len(g) for s, g in runs.items()} }")
  envs = {t.env.id for games in runs.values() for t in games}
  if len(envs) != 1:
    raise ValueError(f"runs mix environments {sorted(envs)}")
  pass_rates, tokens_per_seed, turns_per_seed = [], [], []
  all_tokens, all_truncated, all_turns = [], [], []
  for seed, games in runs.items():
    for g, t in enumerate(games):
      if t.outcome is None:
        raise ValueError(f"run {seed}, trajectory {g} (seed {t.seed}) has no outcome")
    pass_rates.append(sum(t.outcome.success for t in games) / len(games))
    tokens, truncated = _turn_stats(games)
    turns = [len(t.turns) for t in games]
    tokens_per_seed.append(_mean(tokens))
    turns_per_seed.append(_mean(turns))
    all_tokens += tokens
    all_truncated += truncated
    all_turns += turns
  mean = _mean(pass_rates)
  std = (math.sqrt(math.fsum((p - mean) ** 2 for p in pass_rates) / (len(pass_rates) - 1))
         if len(pass_rates) > 1 else 0.0)
  return EvalResult(
      env=envs.pop(), num_games=sizes.pop(), sampling_seeds=seeds,
      with_knowledge=bool(with_knowledge), pass_rates=tuple(pass_rates),
      pass_rate_mean=mean, pass_rate_std=std, pass_rate_min=min(pass_rates),
      pass_rate_max=max(pass_rates), mean_response_tokens=_mean(all_tokens),
      mean_response_tokens_per_seed=tuple(tokens_per_seed), mean_turns=_mean(all_turns),
      mean_turns_per_seed=tuple(turns_per_seed), truncated_fraction=_mean(all_truncated))


def evaluate(sampler: TokenSampler, tokenizer: Any, config: EvalConfig = EvalConfig(), *,
             model: ModelInfo, knowledge: str | None = None,
             trajectory_path: str | None = None) -> EvalResult:
  """Plays the held-out maps once per sampling seed and returns the metrics.

  Args:
    sampler: a `oel_jax.sampling.Sampler` (or anything with its ``generate``).
    tokenizer: the model's tokenizer.
    config: the evaluation settings.
    model: recorded in the trajectories.
    knowledge: a knowledge text to show in every prompt (in-context evaluation), or None.
    trajectory_path: if given, every game of every seed is written there (JSONL, atomic), in
      seed order; each record's metadata holds ``split: "eval"`` and its ``sampling`` seed.
  """
  seeds = config.game_seeds()
  runs: dict[int, list[Trajectory]] = {}
  for s in config.sampling_seeds:
    # One knowledge text in every prompt: prefilled once per sampler call when the sampler
    # can (`oel_jax.sampling.Sampler.generate`'s share_prefix).
    runs[s] = rollout(sampler, tokenizer, seeds, config.rollout_config(s), model=model,
                      knowledge=knowledge, metadata={"split": "eval"},
                      share_prefix=bool(knowledge))
  if trajectory_path is not None:
    write_trajectories(trajectory_path, (t for games in runs.values() for t in games))
  return summarize(runs, with_knowledge=bool(knowledge))
