"""The online OEL loop: rounds of deploy -> collect -> extract -> consolidate -> evaluate -> export.

    config = configs.tiny.get_config()          # an ml_collections ConfigDict
    run = OnlineLoop(config, "runs/tiny")        # validates it before any work
    run.config                                   # the settings as a typed oel_jax.config.RunConfig
    run.run()                                    # every round; resumes where it stopped

Round ``r`` (arXiv:2603.16856 section 3; DESIGN.md section 5.4), in ``workdir/round_{r:03d}/``:

1. ``collect``: the round's deployed model (the initial model for round 0, else round
   ``r - 1``'s ``model/``) plays the extraction games and the consolidation games
   (training board seeds ``game_seeds("train", config.seed, r, ...)``, all in one lockstep
   rollout) -> ``trajectories/extraction.jsonl`` and ``trajectories/consolidation.jsonl``.
2. ``extract``: the deployed model (or ``config.extraction.model``) extracts K knowledge
   texts from the extraction pool (`oel_jax.experience.run_extraction`, resumable inside
   itself) -> ``knowledge/`` (``knowledge_{k}.txt``, ``manifest.json``, snapshots).
3. ``consolidate``: on-policy context distillation of the knowledge into a copy of the
   deployed model against the frozen deployed model as teacher
   (`oel_jax.consolidate.run_consolidation`, orbax checkpoints in ``consolidation/``, resumable
   inside itself); the result is written as a Hugging Face checkpoint to ``model/``, with the
   tokenizer: the model the next round deploys.
4. ``evaluate``: pass rate and response length of ``model/`` on the held-out maps
   (``evaluation/pass_rate.json``), optionally IF-Eval (``evaluation/ifeval.json``) and the
   in-context pass rate of the round-start model with the knowledge in its prompt, after each
   extraction snapshot (``evaluation/in_context.json``).
5. ``export``: ``model/`` again in a serving dtype (``config.export.dtype``, e.g. bfloat16)
   at ``export/``; with no dtype set, ``model/`` is the export and nothing is copied.

Before round 0 the initial model is evaluated the same way (``workdir/initial/``) when
``config.evaluation.initial`` is set, so that the plot starts from the model as it was.

Resuming. Every stage ends by writing ``<stage>.done.json`` (atomically) in its folder, with
its metrics; a stage whose marker exists is skipped, so running the same command again
continues where the run stopped. Extraction and consolidation resume inside themselves from
their own state files. Every random choice derives from ``config.seed`` (board seeds,
sampling seeds per stage and round), and each stage reads its inputs from the files earlier
stages wrote, never from memory, so a resumed run gives the same files, metrics and weights
as an uninterrupted one. ``workdir/config.json`` records the config; running again with a
different one fails, naming the fields that differ (``rounds`` and the logging switches may
change).

Watching a run: progress bars (rollouts, extraction steps, consolidation), absl log lines
per stage, ``workdir/metrics.jsonl`` (rebuilt from the markers after every stage, so it never
holds a record twice), TensorBoard event files in ``workdir/tensorboard/`` (tensorboardX) and
``workdir/plots/rounds.png`` (`oel_jax.plots`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from oel_jax import consolidate as consolidation_lib
from oel_jax import metrics as metrics_lib
from oel_jax import parallel
from oel_jax.atomic_write import atomic_write_text
# DTYPES, default_config and stage_seed are the loop's API too (configs/ import them here).
from oel_jax.config import (  # pylint: disable=unused-import
    DTYPES, ConfigError, RunConfig, default_config, parse, stage_seed)
from oel_jax.consolidate import ConsolidationConfig
from oel_jax.envs import (ModelInfo, RolloutConfig, game_seeds, load_trajectories, rollout,
                          write_trajectories)
from oel_jax.errors import one_line
from oel_jax.evaluate import EvalConfig, evaluate
from oel_jax.experience import (SNAPSHOT_DIR, STATE_FILE, ExtractionConfig, load_knowledge_set,
                                load_state, run_extraction)
from oel_jax.models import check_hf, load_hf, save_hf
from oel_jax.sampling import Sampler
from oel_jax.settings import At, narrow
from oel_jax.train import Trainer

_log = logging.getLogger(__name__)

STAGES = ("collect", "extract", "consolidate", "evaluate", "export")
"""The stages of a round, in order."""

INITIAL = "initial"
"""The folder (and ``--round`` value) of the initial model's evaluation."""

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
MARKER = "{}.done.json"

# Config keys that may change between runs in the same workdir.
MUTABLE_KEYS = ("rounds", "progress", "logging.tensorboard", "logging.plot", "name")


def default_ifeval_path() -> str:
  """IF-Eval's ``input_data.jsonl``: ``$OEL_IFEVAL_PATH``, else ``../shared/data/ifeval/``
  beside this repository's checkout when it is there (as in CI), else ""."""
  path = os.environ.get("OEL_IFEVAL_PATH", "")
  if path:
    return path
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(os.path.dirname(repo), "shared", "data", "ifeval", "input_data.jsonl")
  return path if os.path.isfile(path) else ""


def _dtype(name: str):
  return getattr(jnp, name)


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


def _model_vocab(model: str, errors: list[str]) -> int | None:
  from oel_jax import tiny  # pylint: disable=import-outside-toplevel
  if model == "tiny":
    return tiny.tiny_config().vocab_size
  if not os.path.isdir(model):
    errors.append(f"config.model: {model!r} is neither 'tiny' nor a checkpoint directory "
                  "(download a hub model first, e.g. `huggingface-cli download Qwen/Qwen3-4B "
                  "--local-dir /ckpt/Qwen3-4B`, and pass that directory)")
    return None
  try:
    # Every header is read now, so that a truncated or mismatched checkpoint stops the run
    # before any work rather than at its first load.
    return check_hf(model).vocab_size
  except Exception as e:  # pylint: disable=broad-except
    errors.append(f"config.model: {one_line(e)}")
    return None


def plan(config: ml_collections.ConfigDict | Mapping[str, Any] | RunConfig, *,
         num_devices: int | None = None) -> Plan:
  """Validates ``config`` and checks it against the model, the devices and the files named;
  nothing is loaded or run.

  Raises:
    ConfigError: listing every invalid value, each named by its config field.
  """
  run, errors = parse(config)
  ok = At("config", errors).ok
  vocab = _model_vocab(run.model, errors) if ok("model") else None
  if vocab is not None and ok("train.k") and run.train.k > vocab:
    errors.append(f"config.train.k ({run.train.k}) exceeds the model's vocabulary ({vocab} rows)")
  extractor = run.extraction.model
  if ok("extraction.model") and extractor and not os.path.isdir(extractor):
    errors.append(f"config.extraction.model: {extractor!r} is not a checkpoint directory")
  ifeval = run.ifeval
  if ok("ifeval.enabled", "ifeval.path") and ifeval.enabled and not os.path.isfile(ifeval.path):
    errors.append(f"config.ifeval.path: {ifeval.path!r} is not a file (IF-Eval's "
                  "input_data.jsonl); set it, or config.ifeval.enabled=False")

  devices = num_devices if num_devices is not None else jax.device_count()
  mesh_shape: dict[str, int] = {}
  if ok("mesh", "consolidation.games_per_step", "train.micro_batches"):
    mesh_shape, found = run.resolve_mesh(devices)
    errors.extend(found)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  return Plan(config=run, model_vocab_size=vocab, mesh_shape=mesh_shape)


# ---------------------------------------------------------------------------------------------
# Files.


def _atomic_json(path: str, data: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False, allow_nan=True) + "\n")


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def round_dir(workdir: str, round_: int | str) -> str:
  """``workdir/round_{r:03d}`` (or ``workdir/initial``)."""
  name = INITIAL if round_ == INITIAL else f"round_{int(round_):03d}"
  return os.path.join(workdir, name)


def _recorded_config(data: Any) -> Any:
  """A workdir's recorded config as `RunConfig.to_dict` writes it now (an older record wrote 0
  for unset optional integers), or as it is when it no longer parses."""
  run, errors = parse(data)
  return data if errors else run.to_dict()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(data, Mapping):
    out = {}
    for k, v in data.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  if isinstance(data, tuple):
    data = list(data)
  return {prefix[:-1]: data}


# ---------------------------------------------------------------------------------------------
# The loop.


class OnlineLoop:
  """Runs OEL rounds in a workdir, stage by stage, resumably (see the module docstring).

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
    self.workdir = os.path.abspath(workdir)
    self._models: dict[str, Any] = {}
    self._tokenizer = None
    self._samplers: dict[Any, Any] = {}
    self._holds: dict[Any, str] = {}
    self._mesh = None
    self._writer = None
    self._trainer = None

  # ---- bookkeeping ----

  def check_workdir(self) -> None:
    """Records the config in a new workdir, or checks it against the recorded one.

    Raises:
      ConfigError: the workdir holds a run whose config differs (other than `MUTABLE_KEYS`).
    """
    path = os.path.join(self.workdir, CONFIG_FILE)
    current = self.config.to_dict()
    if os.path.exists(path):
      old = _flatten(_recorded_config(_read_json(path)))
      new = _flatten(current)
      differ = sorted(k for k in set(old) | set(new)
                      if old.get(k) != new.get(k) and not any(
                          k == m or k.startswith(m + ".") for m in MUTABLE_KEYS))
      if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"{path}: this workdir holds a run with another config ({shown}"
                          f"{', ...' if len(differ) > 5 else ''}); use the same config to "
                          "resume it, or another --workdir")
    os.makedirs(self.workdir, exist_ok=True)
    _atomic_json(path, current)

  def marker_path(self, round_: int | str, stage: str) -> str:
    """The completion marker of a stage."""
    return os.path.join(round_dir(self.workdir, round_), MARKER.format(stage))

  def done(self, round_: int | str, stage: str) -> bool:
    """Whether a stage has completed."""
    return os.path.exists(self.marker_path(round_, stage))

  def marker(self, round_: int | str, stage: str) -> dict[str, Any] | None:
    """A completed stage's marker (its metrics and artifacts), or None."""
    path = self.marker_path(round_, stage)
    return _read_json(path) if os.path.exists(path) else None

  def _finish(self, round_: int | str, stage: str, start: float, metrics: dict[str, Any],
              artifacts: dict[str, str]) -> dict[str, Any]:
    record = {"stage": stage, "round": round_, "seconds": time.perf_counter() - start,
              "completed": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "metrics": metrics,
              "artifacts": {k: os.path.relpath(v, self.workdir) for k, v in artifacts.items()}}
    _atomic_json(self.marker_path(round_, stage), record)
    _log.info("round %s: %s done in %.1fs: %s", round_, stage, record["seconds"],
              metrics_lib.brief(stage, metrics))
    self._publish(record)
    return record

  def _publish(self, record: dict[str, Any] | None = None) -> None:
    """Rebuilds metrics.jsonl and the plot from the markers; logs the new record to TB."""
    markers = self.markers()
    metrics_lib.write_jsonl(os.path.join(self.workdir, "metrics.jsonl"), markers)
    _atomic_json(os.path.join(self.workdir, SUMMARY_FILE), metrics_lib.summary(markers))
    if record is not None and self.config.logging.tensorboard:
      if self._writer is None:
        self._writer = metrics_lib.TensorBoard(os.path.join(self.workdir, "tensorboard"))
      self._writer.write(record, steps_per_round=self.plan.consolidation.steps)
    if self.config.logging.plot and (record is None or record["stage"] == "evaluate"):
      from oel_jax import plots  # pylint: disable=import-outside-toplevel
      plots.plot_rounds(markers, os.path.join(self.workdir, "plots", "rounds.png"),
                        title=str(self.config.name))

  def markers(self) -> list[dict[str, Any]]:
    """Every completed stage's marker, initial evaluation first, then by round and stage."""
    out = []
    for r in [INITIAL] + list(range(self._rounds_on_disk())):
      for stage in STAGES:
        m = self.marker(r, stage)
        if m is not None:
          out.append(m)
    return out

  def _rounds_on_disk(self) -> int:
    n = int(self.config.rounds)
    if os.path.isdir(self.workdir):
      for name in os.listdir(self.workdir):
        if name.startswith("round_") and name[6:].isdigit():
          n = max(n, int(name[6:]) + 1)
    return n

  # ---- models ----

  def deployed_path(self, round_: int) -> str:
    """The model round ``round_`` deploys: the config's model, or the previous round's."""
    if round_ == 0:
      return self.config.model
    return os.path.join(round_dir(self.workdir, round_ - 1), "model")

  def tokenizer(self):
    """The run's tokenizer (the model's own, or the tiny one)."""
    if self._tokenizer is None:
      from oel_jax import chat, tiny  # pylint: disable=import-outside-toplevel
      name = self.config.tokenizer or self.config.model
      self._tokenizer = tiny.load_tiny_tokenizer() if name == "tiny" else \
          chat.load_tokenizer(name)
    return self._tokenizer

  def mesh(self):
    """The device mesh (None on a single device)."""
    size = int(np.prod(list(self.plan.mesh_shape.values())))
    if self._mesh is None and size > 1:
      self._mesh = parallel.make_mesh(parallel.MeshConfig(**self.plan.mesh_shape),
                                      devices=jax.devices()[:size])
    return self._mesh

  def load_model(self, path: str):
    """Loads ``"tiny"`` or a HF checkpoint (the last one loaded is cached)."""
    if path in self._models:
      return self._models[path]
    from oel_jax import tiny  # pylint: disable=import-outside-toplevel
    param, compute = _dtype(self.config.param_dtype), _dtype(self.config.compute_dtype)
    if path == "tiny":
      model = tiny.tiny_model(param_dtype=param, compute_dtype=compute)
      if self.mesh() is not None:
        parallel.shard_model(model, self.mesh())
    else:
      model = load_hf(path, dtype=param, compute_dtype=compute, mesh=self.mesh())
    self._models = {path: model}  # Keep one: real models are large.
    return model

  def sampler(self, path: str, tokenizer: Any = None):
    """A sampler holding the weights of ``path``: one per architecture, reused (and its
    compiled programs with it) by swapping weights."""
    from oel_jax import chat  # pylint: disable=import-outside-toplevel
    model = self.load_model(path)
    key = model.config
    sampler = self._samplers.get(key)
    if sampler is None:
      tok = tokenizer or self.tokenizer()
      stops = chat.stop_token_ids(tok)
      sampler = Sampler(model, eos_ids=stops,
                        pad_id=tok.pad_token_id if tok.pad_token_id is not None else stops[0],
                        max_seq_len=int(self.config.max_seq_len),
                        buckets_per_doubling=self.config.sampler_buckets_per_doubling,
                        mesh=self.mesh())
      self._samplers[key] = sampler
    elif self._holds.get(key) != path:
      sampler.update_weights(model)
    self._holds[key] = path
    return sampler

  def _model_info(self, round_: int):
    return ModelInfo(str(self.deployed_path(round_)), round_)

  # ---- stages ----

  def collect(self, round_: int) -> dict[str, Any]:
    """Plays the round's extraction and consolidation games with the deployed model."""
    start = time.perf_counter()
    folder = os.path.join(round_dir(self.workdir, round_), "trajectories")
    os.makedirs(folder, exist_ok=True)
    p = self.plan
    boards = game_seeds("train", self.config.seed, round_, p.extraction_boards)
    consol = game_seeds("train", self.config.seed, round_, p.consolidation_games,
                        start=p.extraction_boards)
    sampler, tokenizer, info = (self.sampler(self.deployed_path(round_)), self.tokenizer(),
                                self._model_info(round_))
    # Play k of every board is the k-th chunk of the pool (run k reads it with pool_order
    # "chunks"); each play is its own game, as the official K extraction jobs are.
    plays = [k for k in range(p.extraction_plays) for _ in boards]
    timings: dict[str, float] = {}
    pools = {}
    for pool, seeds, play in (("extraction", boards * p.extraction_plays, plays),
                              ("consolidation", consol, None)):
      pool_timings: dict[str, float] = {}
      pools[pool] = rollout(sampler, tokenizer, seeds, p.rollout_for(round_, pool), model=info,
                            timings=pool_timings, metadata={"split": "train", "pool": pool},
                            plays=play)
      for key, value in pool_timings.items():
        timings[key] = timings.get(key, 0.0) + value
    extract_path = os.path.join(folder, "extraction.jsonl")
    consol_path = os.path.join(folder, "consolidation.jsonl")
    write_trajectories(extract_path, pools["extraction"])
    write_trajectories(consol_path, pools["consolidation"])
    games = pools["extraction"] + pools["consolidation"]
    metrics = {"extraction": metrics_lib.game_stats(pools["extraction"]),
               "consolidation": metrics_lib.game_stats(pools["consolidation"]),
               "all": metrics_lib.game_stats(games), "timings": timings}
    tokens = metrics["all"]["response_tokens"]
    metrics["tokens_per_s"] = tokens / timings["generate_s"] if timings.get("generate_s") else 0.0
    return self._finish(round_, "collect", start, metrics,
                        {"extraction": extract_path, "consolidation": consol_path})

  def extract(self, round_: int) -> dict[str, Any]:
    """Extracts the round's knowledge set (resumes an interrupted extraction)."""
    self._require(round_, "collect")
    start = time.perf_counter()
    folder = round_dir(self.workdir, round_)
    pool = load_trajectories(os.path.join(folder, "trajectories", "extraction.jsonl"))
    config = self.plan.extraction_for(round_)
    out_dir = os.path.join(folder, "knowledge")
    done = 0
    state_path = os.path.join(out_dir, STATE_FILE)
    if os.path.exists(state_path):
      done = load_state(state_path).step
      _log.info("round %d: extraction resumes at step %d of %d", round_, done,
                config.num_trajectories)
    extractor = self.config.extraction.model or self.deployed_path(round_)
    # Knowledge from another model (a baseline): its own tokenizer and sampler.
    tokenizer = self.tokenizer()
    if self.config.extraction.model:
      from oel_jax import chat  # pylint: disable=import-outside-toplevel
      tokenizer = chat.load_tokenizer(extractor)
    bar = tqdm(total=config.num_trajectories, initial=done, unit="step",
               desc=f"round {round_} extraction (K={config.num_runs})",
               disable=not self.config.progress, leave=False)
    try:
      state = run_extraction(pool, config, tokenizer=tokenizer,
                             sampler=self.sampler(extractor, tokenizer), out_dir=out_dir,
                             on_step=lambda s: bar.update(1))
    finally:
      bar.close()
    metrics = metrics_lib.extraction_stats(state)
    return self._finish(round_, "extract", start, metrics, {"knowledge": out_dir})

  def consolidate(self, round_: int) -> dict[str, Any]:
    """Consolidates the knowledge into the deployed model; writes ``model/``."""
    self._require(round_, "collect")
    self._require(round_, "extract")
    start = time.perf_counter()
    folder = round_dir(self.workdir, round_)
    trajectories = load_trajectories(os.path.join(folder, "trajectories",
                                                  "consolidation.jsonl"))
    knowledge = load_knowledge_set(os.path.join(folder, "knowledge")).texts
    config = self.plan.consolidation_for(round_)
    if config.context == "raw_trajectories":  # Baseline: raw trajectories as the context.
      knowledge = consolidation_lib.raw_trajectory_contexts(
          load_trajectories(os.path.join(folder, "trajectories", "extraction.jsonl")),
          self.tokenizer(), num_contexts=self.plan.extraction.num_runs,
          max_tokens=self.plan.extraction.max_knowledge_tokens, seed=config.seed)
    path = self.deployed_path(round_)
    sampler = self.sampler(path)
    # The round-start model is both the student's starting point and the frozen teacher
    # (run_consolidation trains a copy and never writes either).
    model = self.load_model(path)
    if self._trainer is None:
      self._trainer = Trainer(model, config.train, mesh=self.mesh())
    self._holds.pop(model.config, None)  # Consolidation swaps the student's weights in.
    result = consolidation_lib.run_consolidation(
        model, model, self.tokenizer(), trajectories, list(knowledge), config,
        workdir=os.path.join(folder, "consolidation"), mesh=self.mesh(), sampler=sampler,
        trainer=self._trainer, progress=bool(self.config.progress))
    model = result.model
    out = os.path.join(folder, "model")
    tmp = out + ".tmp"
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    save_hf(model, tmp, tokenizer=self.tokenizer())
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
    metrics = metrics_lib.consolidation_stats(result)
    del model, result
    return self._finish(round_, "consolidate", start, metrics, {"model": out})

  def evaluate(self, round_: int | str) -> dict[str, Any]:
    """Evaluates the round's consolidated model (or the initial model for ``"initial"``)."""
    start = time.perf_counter()
    folder = round_dir(self.workdir, round_)
    out = os.path.join(folder, "evaluation")
    os.makedirs(out, exist_ok=True)
    artifacts: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    if round_ == INITIAL:
      path, info = self.config.model, ModelInfo(str(self.config.model), 0)
    else:
      self._require(round_, "consolidate")
      path = os.path.join(folder, "model")
      info = ModelInfo(path, int(round_) + 1)
      if self.config.evaluation.in_context:
        metrics["in_context"] = self._in_context(round_, out)
        artifacts["in_context"] = os.path.join(out, "in_context.json")
    result = evaluate(self.sampler(path), self.tokenizer(), self.plan.evaluation, model=info,
                      trajectory_path=os.path.join(out, "games.jsonl"))
    _atomic_json(os.path.join(out, "pass_rate.json"), result.to_dict())
    metrics["pass_rate"] = result.to_dict()
    artifacts.update(pass_rate=os.path.join(out, "pass_rate.json"),
                     games=os.path.join(out, "games.jsonl"))
    if self.config.ifeval.enabled:
      metrics["ifeval"] = self._ifeval(path, out)
      artifacts["ifeval"] = os.path.join(out, "ifeval.json")
    return self._finish(round_, "evaluate", start, metrics, artifacts)

  def _in_context(self, round_: int, out: str) -> list[dict[str, Any]]:
    """Pass rate of the round-start model with the knowledge of each extraction snapshot."""
    folder = round_dir(self.workdir, round_)
    config = self.plan.extraction_for(round_)
    n, every = config.num_trajectories, config.snapshot_every
    steps = [s for s in range(every, n, every)] if every else []
    sets = [(s, os.path.join(folder, "knowledge", SNAPSHOT_DIR.format(s))) for s in steps]
    sets.append((n, os.path.join(folder, "knowledge")))
    run = int(self.config.evaluation.in_context_run)
    sampler = self.sampler(self.deployed_path(round_))
    records = []
    for step, knowledge_dir in sets:
      text = load_knowledge_set(knowledge_dir).texts[run]
      result = evaluate(sampler, self.tokenizer(), self.plan.evaluation,
                        model=self._model_info(round_), knowledge=text)
      records.append({"step": step, "num_trajectories": n, "knowledge_run": run,
                      **result.to_dict()})
    _atomic_json(os.path.join(out, "in_context.json"), records)
    return records

  def _ifeval(self, path: str, out: str) -> dict[str, Any]:
    from oel_jax.ifeval import evaluate_ifeval  # pylint: disable=import-outside-toplevel
    c = self.config.ifeval
    params = c.sampling_params
    result = evaluate_ifeval(
        self.sampler(path), self.tokenizer(), path=c.path, enable_thinking=params.enable_thinking,
        limit=c.limit or None, batch_size=c.batch_size, seed=c.seed,
        **params.generate_kwargs())
    data = result.to_dict() if hasattr(result, "to_dict") else dataclasses.asdict(result)
    _atomic_json(os.path.join(out, "ifeval.json"), data)
    s = result.scores
    return {"prompt_level_strict": s.prompt_level_strict,
            "prompt_level_loose": s.prompt_level_loose,
            "instruction_level_strict": s.instruction_level_strict,
            "instruction_level_loose": s.instruction_level_loose,
            "num_prompts": len(result.responses), "num_truncated": result.num_truncated,
            "mean_response_tokens": result.mean_response_tokens}

  def export(self, round_: int) -> dict[str, Any]:
    """Exports the round's model in the serving dtype (or records ``model/`` as the export)."""
    self._require(round_, "consolidate")
    start = time.perf_counter()
    folder = round_dir(self.workdir, round_)
    model_dir = os.path.join(folder, "model")
    dtype = self.config.export.dtype
    if dtype and dtype != self.config.param_dtype:
      out = os.path.join(folder, "export")
      tmp = out + ".tmp"
      if os.path.exists(tmp):
        shutil.rmtree(tmp)
      save_hf(self.load_model(model_dir), tmp, dtype=_dtype(dtype), tokenizer=self.tokenizer())
      if os.path.exists(out):
        shutil.rmtree(out)
      os.replace(tmp, out)
    else:
      out, dtype = model_dir, self.config.param_dtype
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    return self._finish(round_, "export", start, {"dtype": dtype, "files": files,
                                                  "bytes": size}, {"export": out})

  def _require(self, round_: int, stage: str) -> None:
    if not self.done(round_, stage):
      raise RuntimeError(f"round {round_}: stage {stage!r} has not completed "
                         f"({self.marker_path(round_, stage)} missing); run it first "
                         f"(--stage={stage} --round={round_}, or the whole loop)")

  # ---- driving ----

  def run_stage(self, stage: str, round_: int | str) -> dict[str, Any]:
    """Runs one stage of one round unless it is done; returns its marker."""
    if stage not in STAGES:
      raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if round_ == INITIAL and stage != "evaluate":
      raise ValueError(f"round {INITIAL!r} has only the evaluate stage")
    if round_ != INITIAL and not 0 <= int(round_) < int(self.config.rounds):
      raise ValueError(f"round {round_} is outside [0, config.rounds={self.config.rounds})")
    if round_ != INITIAL and int(round_) > 0:
      self._require(int(round_) - 1, "consolidate")
    existing = self.marker(round_, stage)
    if existing is not None:
      _log.info("round %s: %s already done (%s)", round_, stage,
                self.marker_path(round_, stage))
      return existing
    return getattr(self, stage)(round_)

  def run(self) -> dict[str, Any]:
    """Runs every round (skipping completed stages); returns the run's summary."""
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
    self._publish()
    if self._writer is not None:
      self._writer.close()
    return _read_json(os.path.join(self.workdir, SUMMARY_FILE))
