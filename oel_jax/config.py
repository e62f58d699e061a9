"""The run's settings: one tree of frozen, typed dataclasses, `RunConfig`.

Every setting of a run is declared once, here or in the stage dataclass that uses it, with its
default, its rule (`oel_jax.settings`) and a docstring. The sections are the stages' own
configs wherever they can be: ``config.rollout`` is a `oel_jax.envs.RolloutConfig`,
``config.consolidation`` a `oel_jax.consolidate.ConsolidationConfig`, ``config.train`` a
`oel_jax.train.TrainConfig`, ``config.mesh`` a `oel_jax.parallel.MeshConfig`;
``config.extraction`` and ``config.evaluation`` extend `oel_jax.experience.ExtractionConfig`
and `oel_jax.evaluate.EvalConfig` with the loop's own switches. A few section fields are set
by the loop rather than by the config file (`LOOP_SET`): the per-round seeds, each pool's
sampling, and the fields that repeat a top-level setting (``config.env``, ``config.train``, ...),
which the tree fills in from it.

Why config files stay ml_collections ConfigDicts, turned into this tree: ml_collections'
``DEFINE_config_dataclass`` applies ``--config.a.b=v`` overrides with ``setattr`` on the
dataclass holding the field (``config_flags/config_path.py``), which frozen dataclasses refuse;
the tree is frozen so that no stage can change a setting behind the others' backs (and so that
stage configs compare and hash by value). It also could not type a None-able integer so that
the command line overrides it. So a config file edits the ConfigDict that `default_config`
generates from the dataclass defaults (`oel_jax.settings.to_config_dict`), the command line
overrides that, and `RunConfig.from_dict` turns the result into the tree, reporting every
invalid value at once (`ConfigError`). ``workdir/config.json`` is `RunConfig.to_dict`.

Optional integers (None = unset) are ``placeholder(int)`` in the ConfigDict, so
``--config.extraction.max_new_tokens=80`` works; 0 also means None there, as it always has.

Adding a setting is one edit: declare the field (default, rule, docstring) in its section's
dataclass. `default_config`, ``--config.<section>.<field>``, ``config.json`` and the checks
follow; a check between fields goes in the owning dataclass's ``cross_checks``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from oel_jax import settings
from oel_jax.consolidate import ConsolidationConfig
from oel_jax.envs import GAMES, RolloutConfig
from oel_jax.errors import InputError
from oel_jax.evaluate import EvalConfig
from oel_jax.experience import ExtractionConfig
from oel_jax.parallel import MeshConfig
from oel_jax.train import TrainConfig

DTYPES = ("float32", "bfloat16", "float16")
"""Parameter, compute and export dtypes."""

_STAGE_SALT = {"collect": 1, "extract": 2, "consolidate": 3, "evaluate": 4}


class ConfigError(InputError):
  """An invalid config value, found before any work; the message names the field."""


def stage_seed(base: int, round_: int, stage: str, index: int = 0) -> int:
  """The seed of one stage of one round (a 31-bit integer derived from all four)."""
  return int(np.random.SeedSequence([int(base), int(round_) + 1, _STAGE_SALT[stage], int(index)])
             .generate_state(1, np.uint32)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# Sections that are the loop's own.


@dataclasses.dataclass(frozen=True)
class PoolSampling:
  """How the games of one pool sample (defaults: the official deployment rollouts)."""

  temperature: float = settings.temperature(0.7)
  """Sampling temperature (0 = greedy)."""

  top_k: int = settings.top_k(0)
  """Top-k cut (0 = off)."""

  top_p: float = settings.top_p(1.0)
  """Nucleus sampling mass (1 = off)."""

  def __post_init__(self):
    settings.check(self)


SOURCES = ("play", "files")
"""Where a round's experience comes from (`CollectConfig.source`)."""

LATER_ROUNDS = ("all", "new")
"""What rounds after the first read of recorded experience (`CollectConfig.later_rounds`)."""


@dataclasses.dataclass(frozen=True)
class CollectConfig:
  """Where each round's experience comes from: games the deployed model plays (how many, how
  each pool samples), or recorded experience read from files."""

  source: str = settings.choice("play", SOURCES)
  """"play": the deployed model plays ``config.env``'s games; "files": recorded experience
  (``trajectory_files`` and/or ``served_workdir``) is read instead, and every record goes to
  both the extraction and the consolidation pool (`oel_jax.stages.collect`)."""

  trajectory_files: str = settings.text("")
  """source "files": trajectory files (JSONL records, e.g. from ``python -m
  oel_jax.trajectories import``): a glob, or several separated by commas."""

  served_workdir: str = settings.text("")
  """source "files": a serve workdir (``python -m oel_jax.serve --workdir``) whose log of
  served conversations and feedback is read."""

  served_until: str = settings.text("")
  """The serve log's cut-off: unix seconds or an ISO 8601 time (UTC unless it names a zone);
  "" = the time the round's collect runs (each process's own clock: on several processes, set
  it, so that every process reads the same requests)."""

  later_rounds: str = settings.choice("all", LATER_ROUNDS)
  """source "files", rounds after the first: "all" reads all the recorded experience again;
  "new" only what no earlier round read (files whose contents no earlier round read; served
  requests created after the previous round's cut-off)."""

  extraction_boards: int = settings.integer(0, minimum=0)
  """Boards for extraction; 0 = ``extraction.num_trajectories`` (n)."""

  extraction_plays: int = settings.integer(0, minimum=0)
  """Plays of each board; 0 = ``extraction.num_runs`` (K): with pool_order "chunks", run k reads
  play k (the official way), and each play is its own game (its own sampling seeds)."""

  consolidation_games: int = settings.integer(0, minimum=0)
  """Games for consolidation; 0 = ``consolidation.steps * consolidation.games_per_step``."""

  extraction_sampling: PoolSampling = settings.section(PoolSampling, top_k=20, top_p=0.8)
  """The extraction pool's sampling: the official extraction rollouts run in validate mode,
  with the evaluation settings."""

  consolidation_sampling: PoolSampling = settings.section(PoolSampling)
  """The consolidation pool's sampling: the official deployment (training) rollouts,
  temperature 0.7, top-p 1."""

  def __post_init__(self):
    settings.check(self)

  @property
  def recorded(self) -> bool:
    """Whether rounds read recorded experience instead of playing."""
    return self.source == "files"

  def cross_checks(self, at: settings.At) -> list[str]:
    """Recorded experience: something to read, a readable cut-off, nothing set in vain."""
    out = []
    if not at.ok("source", "trajectory_files", "served_workdir", "served_until"):
      return out
    named = [n for n in ("trajectory_files", "served_workdir", "served_until")
             if getattr(self, n)]
    if self.recorded and not (self.trajectory_files or self.served_workdir):
      out.append(f"{at('source')} 'files' reads {at('trajectory_files')} and/or "
                 f"{at('served_workdir')}; set one")
    if not self.recorded and named:
      out.append(f"{', '.join(at(n) for n in named)}: read only with {at('source')}='files' "
                 f"(it is {self.source!r})")
    if self.served_until and not self.served_workdir:
      out.append(f"{at('served_until')} needs {at('served_workdir')}")
    if self.served_until:
      # Imported here: oel_jax.trajectories imports oel_jax.envs, as this module does.
      from oel_jax.trajectories.records import parse_time  # pylint: disable=import-outside-toplevel
      try:
        parse_time(self.served_until)
      except ValueError as e:
        out.append(f"{at('served_until')}: {e}")
    return out


@dataclasses.dataclass(frozen=True)
class ExtractionSection(ExtractionConfig):
  """`ExtractionConfig` plus the loop's choice of extractor."""

  model: str = settings.text("")
  """"" = the deployed model extracts; else a checkpoint directory or a hub id
  (``owner/name[@revision]``, `oel_jax.hub`) (a baseline)."""


@dataclasses.dataclass(frozen=True)
class EvaluationSection(EvalConfig):
  """`EvalConfig` plus what else the loop evaluates."""

  initial: bool = settings.boolean(True)
  """Also evaluate the initial model (``workdir/initial/``)."""

  in_context: bool = settings.boolean(False)
  """Also evaluate the round-start model with knowledge in context (at every extraction
  snapshot and at the end)."""

  in_context_run: int = settings.integer(0, minimum=0)
  """Which of the K knowledge texts goes in context."""

  games: bool = settings.boolean(True)
  """Play ``config.env``'s held-out games (pass rate). Off (e.g. for recorded experience that is
  not one of our games): no game is played; IF-Eval still runs when ``config.ifeval.enabled``,
  and with neither the evaluate stage records no metrics."""


@dataclasses.dataclass(frozen=True)
class IfevalConfig:
  """IF-Eval after every round, as the official README runs it (lm-eval's ifeval task through
  vLLM): thinking off for every model, temperature 0.7, top-p 0.8, top-k 20, seed 42, one
  sample per prompt, 1280 new tokens."""

  enabled: bool = settings.boolean(False)
  """IF-Eval at the end of every round (and for the initial model)."""

  path: str = settings.text("")
  """IF-Eval's input_data.jsonl."""

  limit: int = settings.integer(0, minimum=0)
  """First this many prompts; 0 = all 541."""

  max_new_tokens: int = settings.max_new_tokens(1280)
  """Token budget of one reply."""

  enable_thinking: bool = settings.boolean(False)
  """Chat-template thinking mode."""

  batch_size: int = settings.integer(16, minimum=1)
  """Prompts per sampler call."""

  temperature: float = settings.temperature(0.7)
  """Sampling temperature; 0 = greedy."""

  top_k: int = settings.top_k(20)
  """Top-k cut (0 = off)."""

  top_p: float = settings.top_p(0.8)
  """Nucleus sampling mass."""

  seed: int = settings.integer(42, minimum=0)
  """Sampling seed."""

  def __post_init__(self):
    settings.check(self)

  @property
  def sampling_params(self) -> settings.SamplingParams:
    """The settings of each sampler call."""
    return settings.SamplingParams.of(self)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """The serving copy of each round's model."""

  dtype: str = settings.choice("", ("",) + DTYPES)
  """"" = ``model/`` is the export; else e.g. "bfloat16" -> ``export/``."""

  def __post_init__(self):
    settings.check(self)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """What the run writes besides its markers and metrics.jsonl."""

  tensorboard: bool = settings.boolean(True)
  """TensorBoard event files in ``workdir/tensorboard/``."""

  plot: bool = settings.boolean(True)
  """``workdir/plots/rounds.png``."""

  def __post_init__(self):
    settings.check(self)


# ---------------------------------------------------------------------------------------------
# The tree.

_SEEDS = "every seed derives from config.seed"
_PER_POOL = ("set per pool, in config.collect.extraction_sampling.{0} and "
             "config.collect.consolidation_sampling.{0}")

LOOP_SET: dict[str, str] = {
    "rollout.env": "it is config.env",
    "rollout.env_settings": "it is config.env_settings",
    "rollout.progress": "it is config.progress",
    "rollout.seed": _SEEDS,
    **{f"rollout.{k}": _PER_POOL.format(k) for k in ("temperature", "top_k", "top_p")},
    "extraction.seed": _SEEDS,
    "consolidation.seed": _SEEDS,
    "consolidation.train": "the optimizer is config.train",
    "evaluation.env": "it is config.env",
    "evaluation.env_settings": "it is config.env_settings",
    "evaluation.progress": "it is config.progress",
}
"""Section fields the loop sets (path under ``config`` -> why): they are not in config files."""

# Section fields filled in from another setting of the tree (messages name the source).
_ALIASES = {f"config.{k}": v[6:] for k, v in LOOP_SET.items() if v.startswith("it is ")}
_ALIASES["config.consolidation.train"] = "config.train"


def _loop_set(path: str) -> bool:
  return path.partition(".")[2] in LOOP_SET if path.startswith("config.") else path in LOOP_SET


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of an OEL run (`oel_jax.loop.OnlineLoop`), defaults: the paper's procedure.

  Seeds are not set per section: each stage's seed derives from ``seed`` and the round.
  """

  name: str = settings.text("oel")
  """A label for logs and plots."""

  model: str = settings.text("tiny")
  """"tiny" (built-in, random weights), a Hugging Face checkpoint directory, or a hub id
  ``owner/name[@revision]`` resolved into the huggingface_hub cache (`oel_jax.hub`)."""

  tokenizer: str = settings.text("")
  """"" = the model's (tiny: the built-in tiny tokenizer)."""

  param_dtype: str = settings.choice("float32", DTYPES)
  """Weights as stored and trained (float32 master weights)."""

  compute_dtype: str = settings.choice("bfloat16", DTYPES)
  """Matmuls and activations (paper: bf16 compute)."""

  seed: int = settings.integer(0, minimum=0)
  """Every board, sampling and data-order seed derives from it."""

  rounds: int = settings.integer(3, minimum=1)
  """OEL rounds."""

  max_seq_len: int = settings.integer(16384, minimum=16)
  """Sampler: longest prompt + generation."""

  sampler_buckets_per_doubling: int = settings.integer(1, minimum=1)
  """Sampler: padded prompt lengths and batch sizes per power of two (2: at most 1.5x padding,
  more programs)."""

  progress: bool = settings.boolean(True)
  """Progress bars."""

  mesh: MeshConfig = settings.section(MeshConfig)
  """Device mesh axes (`oel_jax.parallel.MeshConfig`)."""

  env: str = settings.choice("frozenlake", GAMES)
  """The game: "frozenlake" or "sokoban" (paper settings)."""

  env_settings: Mapping[str, Any] = settings.mapping()
  """`oel_jax.envs.make_env` overrides; empty = the paper's."""

  rollout: RolloutConfig = settings.section(RolloutConfig)
  """Deployment rollouts (collection), shared by both pools: the official rollout settings."""

  collect: CollectConfig = settings.section(CollectConfig)
  """How many games the deployed model plays per round, and how each pool samples."""

  extraction: ExtractionSection = settings.section(ExtractionSection)
  """Extraction (knowledge from the extraction pool)."""

  consolidation: ConsolidationConfig = settings.section(ConsolidationConfig)
  """Consolidation. mode "off_policy" (with train.divergence "forward_kl") and context
  "raw_trajectories" are the paper's baselines."""

  train: TrainConfig = settings.section(TrainConfig)
  """Consolidation's optimizer and loss."""

  evaluation: EvaluationSection = settings.section(EvaluationSection)
  """Held-out evaluation."""

  ifeval: IfevalConfig = settings.section(IfevalConfig)
  """IF-Eval, the out-of-distribution check."""

  export: ExportConfig = settings.section(ExportConfig)
  """The serving copy."""

  logging: LoggingConfig = settings.section(LoggingConfig)
  """TensorBoard and plots."""

  def __post_init__(self):
    with settings.deferred():
      self._fill_in()
    if not settings.is_deferred():
      errors = self.problems()
      if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

  def _fill_in(self) -> None:
    """Sets the section fields that repeat a top-level setting (see `LOOP_SET`)."""
    shared = {"env": self.env, "env_settings": dict(self.env_settings)
              if isinstance(self.env_settings, Mapping) else self.env_settings,
              "progress": self.progress}
    for name in ("rollout", "evaluation"):
      section = getattr(self, name)
      if dataclasses.is_dataclass(section):
        object.__setattr__(self, name, dataclasses.replace(section, **shared))
    if isinstance(self.consolidation, ConsolidationConfig):
      object.__setattr__(self, "consolidation",
                         dataclasses.replace(self.consolidation, train=self.train))

  def problems(self) -> list[str]:
    """Every invalid value of the tree, named by its config path."""
    return settings.problems(self, "config", skip=_loop_set, aliases=_ALIASES)

  def cross_checks(self, at: settings.At) -> list[str]:
    """Checks between sections: pool sizes, the in-context run, token budgets."""
    out = []
    ex = self.extraction
    # Recorded experience: the pool's size is known when collect reads it (checked there).
    if at.ok("collect", "extraction.num_trajectories", "extraction.num_runs",
             "extraction.pool_order") and not self.collect.recorded:
      n, k = ex.num_trajectories, ex.num_runs
      boards, plays = self.extraction_boards, self.extraction_plays
      pool = boards * plays
      if ex.pool_order == "chunks" and pool < n * k:
        out.append(f"config.extraction.pool_order 'chunks' needs num_trajectories x num_runs = "
                   f"{n * k} trajectories; collect plays {boards} boards x {plays} plays = "
                   f"{pool} (raise config.collect.extraction_boards or extraction_plays)")
      if ex.pool_order == "shuffle" and pool < n:
        out.append(f"config.extraction.num_trajectories ({n}) exceeds the extraction pool "
                   f"({boards} boards x {plays} plays = {pool})")
    ev = self.evaluation
    if at.ok("evaluation.in_context", "evaluation.games") and ev.in_context and not ev.games:
      out.append("config.evaluation.in_context plays the held-out games with knowledge in "
                 "context; it needs config.evaluation.games=True")
    if at.ok("evaluation.in_context", "evaluation.in_context_run", "extraction.num_runs") and \
        ev.in_context and ev.in_context_run >= ex.num_runs:
      out.append(f"config.evaluation.in_context_run ({ev.in_context_run}) must be below "
                 f"extraction.num_runs ({ex.num_runs})")
    for name in ("rollout.max_new_tokens", "evaluation.max_new_tokens",
                 "consolidation.max_new_tokens"):
      section, _, field = name.partition(".")
      budget = getattr(getattr(self, section), field)
      if at.ok(name, "max_seq_len") and budget >= self.max_seq_len:
        out.append(f"config.{name} ({budget}) leaves no room for a prompt in "
                   f"config.max_seq_len ({self.max_seq_len})")
    return out

  def resolve_mesh(self, num_devices: int) -> tuple[dict[str, int], list[str]]:
    """The mesh's axis sizes over ``num_devices`` devices, and what does not fit on them.

    The batches need not divide by the mesh: a consolidation step's rows (one per turn of
    its games, so their number varies) are padded up to micro_batches x data x fsdp rows
    without a scored token, and the sampler pads its batch the same way."""
    try:
      shape = self.mesh.resolve(num_devices)
    except ValueError as e:
      return {}, [f"config.mesh: {e}"]
    per_step, micro = self.consolidation.games_per_step, self.train.micro_batches
    if per_step % micro:
      return shape, [f"config.consolidation.games_per_step ({per_step}) is not divisible by "
                     f"config.train.micro_batches ({micro})"]
    return shape, []

  # ---- what the stages get ----

  @property
  def extraction_boards(self) -> int:
    """Boards played for the extraction pool per round."""
    return self.collect.extraction_boards or self.extraction.num_trajectories

  @property
  def extraction_plays(self) -> int:
    """Plays of each extraction board per round."""
    return self.collect.extraction_plays or self.extraction.num_runs

  @property
  def consolidation_games(self) -> int:
    """Games played for consolidation per round."""
    c = self.consolidation
    return self.collect.consolidation_games or c.steps * c.games_per_step

  def rollout_for(self, round_: int, pool: str = "consolidation") -> RolloutConfig:
    """The round's `RolloutConfig` for the ``"extraction"`` or ``"consolidation"`` pool."""
    sampling = {"extraction": self.collect.extraction_sampling,
                "consolidation": self.collect.consolidation_sampling}[pool]
    return dataclasses.replace(self.rollout, seed=stage_seed(self.seed, round_, "collect"),
                               **settings.to_dict(sampling))

  def extraction_for(self, round_: int) -> ExtractionConfig:
    """The round's `ExtractionConfig` (seed derived from ``seed`` and the round)."""
    return settings.narrow(ExtractionConfig, self.extraction,
                           seed=stage_seed(self.seed, round_, "extract"))

  def consolidation_for(self, round_: int) -> ConsolidationConfig:
    """The round's `ConsolidationConfig`."""
    return dataclasses.replace(self.consolidation,
                               seed=stage_seed(self.seed, round_, "consolidate"))

  def evaluation_config(self) -> EvalConfig:
    """The held-out evaluation's `EvalConfig` (the same every round)."""
    return settings.narrow(EvalConfig, self.evaluation)

  # ---- data ----

  def to_dict(self) -> dict[str, Any]:
    """The settings as JSON data, keyed as config files are (``workdir/config.json``)."""
    return settings.to_dict(self, omit=lambda p: p in LOOP_SET)

  def to_config_dict(self) -> ml_collections.ConfigDict:
    """The settings as the ConfigDict a config file edits."""
    return settings.to_config_dict(self, omit=lambda p: p in LOOP_SET)

  @classmethod
  def from_dict(cls, data: Any) -> RunConfig:
    """The tree from a ConfigDict or `to_dict` data (missing keys take their defaults).

    Raises:
      ConfigError: listing every unknown key and invalid value, each by its config path.
    """
    config, errors = parse(data)
    if errors:
      raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return config


def parse(data: Any) -> tuple[RunConfig, list[str]]:
  """The tree from a ConfigDict, `RunConfig.to_dict` data or a `RunConfig`, and every error
  found in it (the tree holds the invalid values too, for further checks that avoid them)."""
  if isinstance(data, RunConfig):
    return data, data.problems()
  errors: list[str] = []
  refuse = {f"config.{k}": f"not settable here; {v}" for k, v in LOOP_SET.items()}
  config = settings.from_dict(RunConfig, data, path="config", errors=errors, refuse=refuse,
                              zero_is_none=True)
  return config, errors + config.problems()


def default_config() -> ml_collections.ConfigDict:
  """The loop's config with the paper's procedure as defaults (configs/ override it),
  generated from `RunConfig`'s defaults."""
  return RunConfig().to_config_dict()


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file given as ``path`` or ``path:argument`` (the form
  ``--config`` takes).

  Raises:
    InputError: there is no such file, or it defines no ``get_config``.
  """
  path, _, argument = spec.partition(":") if not os.path.isfile(spec) else (spec, "", "")
  if not os.path.isfile(path):
    raise InputError(f"--config: no such config file: {path}")
  module_spec = importlib.util.spec_from_file_location("_oel_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise InputError(f"--config: {path} defines no get_config()")
  return module.get_config(argument) if argument else module.get_config()
