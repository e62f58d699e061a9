"""The online OEL loop: rounds of deploy -> collect -> extract -> consolidate -> evaluate -> export.

    config = configs.tiny.get_config()          # an ml_collections ConfigDict
    run = OnlineLoop(config, "runs/tiny")        # validates it before any work
    run.config                                   # the settings as a typed oel_jax.config.RunConfig
    run.run()                                    # every round; resumes where it stopped

Round ``r`` (arXiv:2603.16856 section 3; DESIGN.md section 5.4), in ``workdir/round_{r:03d}/``,
runs the stages of `oel_jax.stages`, one module each:

1. ``collect``: the round's deployed model (the initial model for round 0, else round
   ``r - 1``'s ``model/``) plays the extraction and consolidation games
   -> ``trajectories/extraction.jsonl`` and ``trajectories/consolidation.jsonl``; or, with
   ``config.collect.source = "files"``, recorded experience (trajectory files, a serve
   workdir's log) is read into both (`oel_jax.stages.collect`).
2. ``extract``: the deployed model (or ``config.extraction.model``) extracts K knowledge
   texts from the extraction pool -> ``knowledge/``.
3. ``consolidate``: on-policy context distillation of the knowledge into a copy of the
   deployed model against the frozen deployed model as teacher -> ``model/``, the model the
   next round deploys.
4. ``evaluate``: pass rate and response length of ``model/`` on the held-out maps
   (``config.evaluation.games``), optionally IF-Eval and the in-context pass rate of the
   round-start model -> ``evaluation/``; with nothing named, empty metrics.
5. ``export``: ``model/`` again in a serving dtype (``config.export.dtype``) at ``export/``.

Before round 0 the initial model is evaluated the same way (``workdir/initial/``) when
``config.evaluation.initial`` is set, so that the plot starts from the model as it was.

Who does what: this module checks the config against the machine (`plan`) and drives the
rounds (`OnlineLoop`); `oel_jax.workdir.Workdir` owns the paths, the done-files, config.json
and the reports; `oel_jax.model_pool.ModelPool` owns the tokenizer, the models and one sampler
per architecture. docs/architecture.md draws the layers.

Resuming. Every stage ends by writing ``<stage>.done.json`` (atomically) in its folder, with
its metrics; a stage whose done-file exists is skipped, so running the same command again
continues where the run stopped. Extraction and consolidation resume inside themselves from
their own state files. Every random choice derives from ``config.seed`` (board seeds,
sampling seeds per stage and round), and each stage reads its inputs from the files earlier
stages wrote, never from memory, so a resumed run gives the same files, metrics and weights
as an uninterrupted one. ``workdir/config.json`` records the config; running again with a
different one fails, naming the fields that differ (``rounds`` and the logging switches may
change).

Watching a run: progress bars (rollouts, extraction steps, consolidation), absl log lines
per stage, ``workdir/metrics.jsonl`` (rebuilt from the done-files after every stage, so it never
holds a record twice), TensorBoard event files in ``workdir/tensorboard/`` (tensorboardX) and
``workdir/plots/rounds.png`` (`oel_jax.plots`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from flax import nnx
from tqdm.auto import tqdm

from oel_jax import hub, parallel, tiny
# DTYPES, default_config and stage_seed are the loop's API too (configs/ import them here).
from oel_jax.config import (  # pylint: disable=unused-import
    DTYPES, CollectConfig, ConfigError, RunConfig, default_config, parse, stage_seed)
from oel_jax.consolidate import ConsolidationConfig
from oel_jax.envs import RolloutConfig
from oel_jax.errors import InputError, one_line
from oel_jax.evaluate import EvalConfig
from oel_jax.experience import ExtractionConfig
from oel_jax.model_pool import ModelPool
from oel_jax.models import check_hf
from oel_jax.models.qwen3 import Qwen3Config, abstract_model
from oel_jax.settings import At, narrow
from oel_jax.stages import RUNNERS
from oel_jax.trajectories.sources import expand_files
# The workdir's names and layout are the loop's API too (tests and scripts import them here).
from oel_jax.workdir import (  # pylint: disable=unused-import
    CONFIG_FILE, DONE_FILE, INITIAL, MUTABLE_KEYS, STAGES, SUMMARY_FILE, Round, Workdir,
    round_dir)

_log = logging.getLogger(__name__)


def default_ifeval_path() -> str:
  """IF-Eval's ``input_data.jsonl``: ``$OEL_IFEVAL_PATH``, else ``../shared/data/ifeval/``
  beside this repository's checkout when it is there (as in CI), else ""."""
  path = os.environ.get("OEL_IFEVAL_PATH", "")
  if path:
    return path
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(os.path.dirname(repo), "shared", "data", "ifeval", "input_data.jsonl")
  return path if os.path.isfile(path) else ""


# ---------------------------------------------------------------------------------------------
# The plan: the config checked against this machine.


@dataclasses.dataclass(frozen=True)
class Plan:
  """The run's settings checked against what is here: the model, the devices, the files."""

  config: RunConfig
  """The run's settings."""
  model_vocab_size: int | None
  """The model's vocabulary rows (None when it could not be read before loading)."""
  mesh_shape: dict[str, int]
  """Mesh axis sizes, resolved against the devices present."""
  model_dirs: dict[str, str] = dataclasses.field(default_factory=dict)
  """Where the models the config names (``model``, ``extraction.model``) lie on this host: a
  directory maps to itself, a hub id to its snapshot in the huggingface_hub cache
  (`oel_jax.hub.resolve_model`); "tiny" is absent. Resolved once here, so that every stage loads
  the same snapshot even if the hub's branch moves during the run. Each process resolves on its
  own host; before the first is read, the processes check that they all hold the same files
  (`oel_jax.model_pool.ModelPool.check_files`)."""

  @property
  def extraction(self) -> ExtractionConfig:
    """The extraction settings (seed 0: see `extraction_for`)."""
    return narrow(ExtractionConfig, self.config.extraction)

  @property
  def consolidation(self) -> ConsolidationConfig:
    """The consolidation settings (seed 0: see `consolidation_for`)."""
    return self.config.consolidation

  @property
  def evaluation(self) -> EvalConfig:
    """The held-out evaluation's settings."""
    return self.config.evaluation_config()

  @property
  def extraction_boards(self) -> int:
    """Boards played for the extraction pool per round."""
    return self.config.extraction_boards

  @property
  def extraction_plays(self) -> int:
    """Plays of each extraction board per round."""
    return self.config.extraction_plays

  @property
  def consolidation_games(self) -> int:
    """Games played for consolidation per round."""
    return self.config.consolidation_games

  def extraction_for(self, round_: int) -> ExtractionConfig:
    """The round's `ExtractionConfig` (seed derived from config.seed and the round)."""
    return self.config.extraction_for(round_)

  def consolidation_for(self, round_: int) -> ConsolidationConfig:
    """The round's `ConsolidationConfig`."""
    return self.config.consolidation_for(round_)

  def rollout_for(self, round_: int, pool: str = "consolidation") -> RolloutConfig:
    """The round's `RolloutConfig` for the ``"extraction"`` or ``"consolidation"`` pool."""
    return self.config.rollout_for(round_, pool)


def _resolve(field: str, spec: str, errors: list[str], dirs: dict[str, str]) -> str | None:
  """``spec``'s checkpoint directory (recorded in ``dirs``), or None with the error added."""
  try:
    dirs[spec] = hub.resolve_model(spec)
  except hub.ModelNotFoundError as e:
    errors.append(f"config.{field}: {one_line(e)}")
    return None
  return dirs[spec]


def _model_config(model: str, errors: list[str], dirs: dict[str, str]) -> Qwen3Config | None:
  if model == "tiny":
    return tiny.tiny_config()
  if not os.path.isdir(model) and hub.parse_hub_id(model) is None:
    errors.append(f"config.model: {model!r} is neither 'tiny' nor a checkpoint directory "
                  "nor a hub id (owner/name or owner/name@revision, e.g. Qwen/Qwen3-4B)")
    return None
  path = _resolve("model", model, errors, dirs)
  if path is None:
    return None
  try:
    # Every header is read now, so that a truncated or mismatched checkpoint stops the run
    # before any work rather than at its first load.
    return check_hf(path)
  except Exception as e:  # pylint: disable=broad-except
    errors.append(f"config.model: {one_line(e)}")
    return None


def _recorded_problems(collect: CollectConfig) -> list[str]:
  """What keeps the recorded experience a config names from being read: a glob that matches no
  file, a serve workdir that is not a folder (the records themselves are read by collect)."""
  out = []
  if collect.trajectory_files:
    try:
      expand_files(collect.trajectory_files, field="config.collect.trajectory_files")
    except InputError as e:
      out.append(str(e))
  if collect.served_workdir and not os.path.isdir(collect.served_workdir):
    out.append(f"config.collect.served_workdir: {collect.served_workdir!r} is not a directory "
               "(a serve workdir: python -m oel_jax.serve --workdir)")
  return out


@functools.lru_cache(maxsize=4)
def _parameters(model: Qwen3Config) -> tuple[tuple[tuple, nnx.Variable], ...]:
  """The model's parameters, shapes and shardings only (tracing its init takes seconds)."""
  return tuple(nnx.to_flat_state(nnx.state(abstract_model(model))))


def _mesh_fits(model: Qwen3Config, mesh_shape: dict[str, int]) -> list[str]:
  """What keeps the model's parameters from being split over the mesh: a sharded dimension
  that its mesh axes do not divide (the first one found), so that a device count that cannot
  work stops the run before any work rather than at the first load."""
  if all(size == 1 for size in mesh_shape.values()):
    return []
  mesh = jax.sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
  for path, variable in _parameters(model):
    try:
      parallel.param_sharding(path, variable, mesh)
    except ValueError as e:
      return [f"config.mesh: the mesh {mesh_shape} cannot split the model's parameters: "
              f"{one_line(e)}; pick axis sizes that divide it"]
  return []


def plan(config: ml_collections.ConfigDict | Mapping[str, Any] | RunConfig, *,
         num_devices: int | None = None) -> Plan:
  """Validates ``config`` and checks it against the model, the devices and the files named;
  nothing is loaded or run.

  Raises:
    ConfigError: listing every invalid value, each named by its config field.
  """
  run, errors = parse(config)
  ok = At("config", errors).ok
  dirs: dict[str, str] = {}
  model = _model_config(run.model, errors, dirs) if ok("model") else None
  vocab = None if model is None else model.vocab_size
  if vocab is not None and ok("train.k") and run.train.k > vocab:
    errors.append(f"config.train.k ({run.train.k}) exceeds the model's vocabulary ({vocab} rows)")
  extractor = run.extraction.model
  if ok("extraction.model") and extractor:
    _resolve("extraction.model", extractor, errors, dirs)
  ifeval = run.ifeval
  if ok("ifeval.enabled", "ifeval.path") and ifeval.enabled and not os.path.isfile(ifeval.path):
    errors.append(f"config.ifeval.path: {ifeval.path!r} is not a file (IF-Eval's "
                  "input_data.jsonl); set it, or config.ifeval.enabled=False")

  if ok("collect.source", "collect.trajectory_files", "collect.served_workdir") and \
      run.collect.recorded:
    errors.extend(_recorded_problems(run.collect))

  devices = num_devices if num_devices is not None else jax.device_count()
  mesh_shape: dict[str, int] = {}
  if ok("mesh", "consolidation.games_per_step", "train.micro_batches"):
    mesh_shape, found = run.resolve_mesh(devices)
    errors.extend(found)
    if mesh_shape and model is not None:
      errors.extend(_mesh_fits(model, mesh_shape))
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  return Plan(config=run, model_vocab_size=vocab, mesh_shape=mesh_shape, model_dirs=dirs)


# ---------------------------------------------------------------------------------------------
# The loop.


class OnlineLoop:
  """Runs OEL rounds in a workdir, stage by stage, resumably (see the module docstring).

  The loop only decides what runs: the `Workdir` (``run.files``) knows the paths, the
  done-files and the reports; the `ModelPool` (``run.pool``) the models and samplers; each
  stage is a module of `oel_jax.stages`.

  Args:
    config: the run's settings: a ConfigDict (`default_config` plus a config file's changes)
      or a `RunConfig`; checked by `plan`.
    workdir: where everything is written; a workdir holding an earlier run of the same config
      is continued.
    num_devices: devices to plan the mesh for (default: all JAX devices).
  """

  def __init__(self, config: ml_collections.ConfigDict | RunConfig, workdir: str, *,
               num_devices: int | None = None):
    self.plan = plan(config, num_devices=num_devices)
    self.config: RunConfig = self.plan.config
    self.files = Workdir(workdir, self.config)
    self.workdir = self.files.path
    self.pool = ModelPool(self.config, self.plan.mesh_shape, self.plan.model_dirs)

  # ---- the workdir ----

  def check_workdir(self) -> None:
    """Records the config in a new workdir, or checks it against the recorded one.

    Raises:
      ConfigError: the workdir holds a run whose config differs (other than `MUTABLE_KEYS`).
    """
    self.files.record_config()

  def marker_path(self, round_: Round, stage: str) -> str:
    """The done-file of a stage."""
    return self.files.done_path(round_, stage)

  def done(self, round_: Round, stage: str) -> bool:
    """Whether a stage has finished."""
    return self.files.done(round_, stage)

  def marker(self, round_: Round, stage: str) -> dict[str, Any] | None:
    """A finished stage's done-file (its metrics and artifacts), or None."""
    return self.files.marker(round_, stage)

  def markers(self) -> list[dict[str, Any]]:
    """Every finished stage's done-file, initial evaluation first, then by round and stage."""
    return self.files.markers()

  def publish(self) -> None:
    """Rebuilds metrics.jsonl, summary.json and the plot from the done-files."""
    self.files.publish()

  def deployed_path(self, round_: int) -> str:
    """The model round ``round_`` deploys: the config's model, or the previous round's."""
    return self.files.deployed_path(round_)

  # ---- models ----

  def tokenizer(self) -> Any:
    """The run's tokenizer (the model's own, or the tiny one)."""
    return self.pool.tokenizer()

  def mesh(self) -> jax.sharding.Mesh | None:
    """The device mesh (None on a single device)."""
    return self.pool.mesh()

  def load_model(self, path: str) -> Any:
    """Loads ``"tiny"`` or a HF checkpoint (the last one loaded is kept)."""
    return self.pool.load(path)

  def sampler(self, path: str, tokenizer: Any = None) -> Any:
    """The sampler of ``path``'s architecture with ``path``'s weights in it."""
    return self.pool.sampler(path, tokenizer)

  # ---- driving ----

  def run_stage(self, stage: str, round_: Round) -> dict[str, Any]:
    """Runs one stage of one round unless it is done; returns its done-file record."""
    if stage not in STAGES:
      raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if round_ == INITIAL and stage != "evaluate":
      raise ValueError(f"round {INITIAL!r} has only the evaluate stage")
    if round_ != INITIAL and not 0 <= int(round_) < int(self.config.rounds):
      raise ValueError(f"round {round_} is outside [0, config.rounds={self.config.rounds})")
    if round_ != INITIAL and int(round_) > 0:
      self.files.require(int(round_) - 1, "consolidate")
    existing = self.marker(round_, stage)
    if existing is not None:
      _log.info("round %s: %s already done (%s)", round_, stage,
                self.marker_path(round_, stage))
      return existing
    return RUNNERS[stage](round_, self.config, self.files, self.pool)

  def run(self) -> dict[str, Any]:
    """Runs every round (skipping finished stages); returns the run's summary."""
    self.check_workdir()
    todo = ([(INITIAL, "evaluate")] if self.config.evaluation.initial else []) + \
        [(r, s) for r in range(int(self.config.rounds)) for s in STAGES]
    bar = tqdm(todo, unit="stage", desc=f"{self.config.name}", disable=not self.config.progress)
    try:
      for r, stage in bar:
        bar.set_postfix(round=r, stage=stage)
        self.run_stage(stage, r)
    finally:
      bar.close()
    self.files.publish()
    self.files.close()
    return self.files.summary()
