"""A run's folder: where each stage's files go, which stages are done, what the run reports.

    workdir = Workdir("runs/tiny", config)       # config: an oel_jax.config.RunConfig
    workdir.record_config()                      # config.json: written, or checked against
    workdir.round_dir(0)                         # runs/tiny/round_000
    workdir.deployed_path(1)                     # runs/tiny/round_000/model
    workdir.done(0, "collect")                   # runs/tiny/round_000/collect.done.json exists
    workdir.finish(0, "collect", start, metrics, artifacts)   # writes it, then publishes

Layout::

    config.json            the run's settings (`record_config`)
    summary.json           every evaluation so far (`oel_jax.metrics.summary`)
    metrics.jsonl          every done-file's metrics as flat records, rebuilt on each publish
    plots/rounds.png       pass rate per round (``config.logging.plot``)
    tensorboard/           event files (``config.logging.tensorboard``)
    initial/               the initial model's evaluation
    round_{r:03d}/         round r: ``<stage>.done.json`` per finished stage, and its files

On several processes every file here is written by process 0 alone and the others wait for
it (`oel_jax.distributed.writer_only`: `write_json`, `Workdir.publish`); every process reads.

A done-file (``<stage>.done.json``, `DONE_FILE`) is the one record that a stage finished: it
is written last and atomically, holds the stage's metrics and its artifacts' paths (relative
to the workdir), and everything the run reports is rebuilt from the done-files alone, so a
resumed run reports what an uninterrupted one does.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from oel_jax import distributed
from oel_jax import metrics as metrics_lib
from oel_jax import plots
from oel_jax.atomic_write import atomic_write_text
from oel_jax.config import ConfigError, RunConfig, parse

_log = logging.getLogger(__name__)

STAGES = ("collect", "extract", "consolidate", "evaluate", "export")
"""The stages of a round, in order."""

INITIAL = "initial"
"""The folder (and ``--round`` value) of the initial model's evaluation."""

CONFIG_FILE = "config.json"
"""The run's recorded settings, in the workdir."""

SUMMARY_FILE = "summary.json"
"""The run's evaluations so far, in the workdir."""

METRICS_FILE = "metrics.jsonl"
"""Every finished stage's metrics as flat records, in the workdir."""

DONE_FILE = "{}.done.json"
"""A finished stage's done-file in its round's folder (``.format(stage)``)."""

MUTABLE_KEYS = ("rounds", "progress", "logging.tensorboard", "logging.plot", "name")
"""Config keys that may change between runs in the same workdir."""

Round = int | str
"""A round number, or `INITIAL`."""


@distributed.writer_only
def write_json(path: str, data: Any) -> None:
  """Writes ``data`` as indented JSON, atomically, making the folder if needed (process 0
  writes, the others wait: `oel_jax.distributed.writer_only`)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False, allow_nan=True) + "\n")


def read_json(path: str) -> Any:
  """Reads a JSON file."""
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def round_dir(workdir: str, round_: Round) -> str:
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


class Workdir:
  """The folder of one run (see the module docstring).

  Args:
    path: the folder (made on `record_config`).
    config: the run's settings: what `record_config` records, how many rounds there are,
      and which reports `publish` writes.
  """

  def __init__(self, path: str, config: RunConfig):
    self.path = os.path.abspath(path)
    self.config = config
    self._writer: Any = None

  # ---- paths ----

  def round_dir(self, round_: Round) -> str:
    """The folder of a round (or of the initial evaluation)."""
    return round_dir(self.path, round_)

  def model_dir(self, round_: int) -> str:
    """The round's consolidated model (a Hugging Face checkpoint)."""
    return os.path.join(self.round_dir(round_), "model")

  def deployed_path(self, round_: int) -> str:
    """The model round ``round_`` deploys: the config's model, or the previous round's."""
    if round_ == 0:
      return self.config.model
    return self.model_dir(round_ - 1)

  def relative(self, path: str) -> str:
    """``path`` relative to the workdir (as done-files record artifacts)."""
    return os.path.relpath(path, self.path)

  # ---- the recorded config ----

  def record_config(self) -> None:
    """Records the config in a new workdir, or checks it against the recorded one.

    Raises:
      ConfigError: the workdir holds a run whose config differs (other than `MUTABLE_KEYS`).
    """
    path = os.path.join(self.path, CONFIG_FILE)
    current = self.config.to_dict()
    if os.path.exists(path):
      old = _flatten(_recorded_config(read_json(path)))
      new = _flatten(current)
      differ = sorted(k for k in set(old) | set(new)
                      if old.get(k) != new.get(k) and not any(
                          k == m or k.startswith(m + ".") for m in MUTABLE_KEYS))
      if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"{path}: this workdir holds a run with another config ({shown}"
                          f"{', ...' if len(differ) > 5 else ''}); use the same config to "
                          "resume it, or another --workdir")
    write_json(path, current)

  # ---- done-files ----

  def done_path(self, round_: Round, stage: str) -> str:
    """The done-file of a stage."""
    return os.path.join(self.round_dir(round_), DONE_FILE.format(stage))

  def done(self, round_: Round, stage: str) -> bool:
    """Whether a stage has finished."""
    return os.path.exists(self.done_path(round_, stage))

  def marker(self, round_: Round, stage: str) -> dict[str, Any] | None:
    """A finished stage's done-file (its metrics and artifacts), or None."""
    path = self.done_path(round_, stage)
    return read_json(path) if os.path.exists(path) else None

  def markers(self) -> list[dict[str, Any]]:
    """Every finished stage's done-file, initial evaluation first, then by round and stage."""
    out = []
    for r in [INITIAL] + list(range(self._rounds_on_disk())):
      for stage in STAGES:
        m = self.marker(r, stage)
        if m is not None:
          out.append(m)
    return out

  def require(self, round_: Round, stage: str) -> None:
    """Raises RuntimeError, saying what to run, unless the stage has finished."""
    if not self.done(round_, stage):
      raise RuntimeError(f"round {round_}: stage {stage!r} has not completed "
                         f"({self.done_path(round_, stage)} missing); run it first "
                         f"(--stage={stage} --round={round_}, or the whole loop)")

  def finish(self, round_: Round, stage: str, start: float, metrics: dict[str, Any],
             artifacts: dict[str, str]) -> dict[str, Any]:
    """Writes a stage's done-file (the stage's last act) and publishes the run's reports.

    Args:
      round_: the round.
      stage: the stage.
      start: the stage's start, a `time.perf_counter` reading.
      metrics: the stage's metrics.
      artifacts: the stage's files by name (absolute paths; recorded relative).

    Returns:
      The done-file's record.
    """
    record = {"stage": stage, "round": round_, "seconds": time.perf_counter() - start,
              "completed": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "metrics": metrics,
              "artifacts": {k: self.relative(v) for k, v in artifacts.items()}}
    write_json(self.done_path(round_, stage), record)
    _log.info("round %s: %s done in %.1fs: %s", round_, stage, record["seconds"],
              metrics_lib.brief(stage, metrics))
    self.publish(record)
    return record

  def _rounds_on_disk(self) -> int:
    n = int(self.config.rounds)
    if os.path.isdir(self.path):
      for name in os.listdir(self.path):
        if name.startswith("round_") and name[6:].isdigit():
          n = max(n, int(name[6:]) + 1)
    return n

  # ---- reports ----

  @distributed.writer_only
  def publish(self, record: dict[str, Any] | None = None) -> None:
    """Rebuilds metrics.jsonl, summary.json and the plot from the done-files; logs ``record``
    (a stage just finished) to TensorBoard. Process 0 writes them all (the TensorBoard
    writer lives there only); the others wait."""
    markers = self.markers()
    metrics_lib.write_jsonl(os.path.join(self.path, METRICS_FILE), markers)
    write_json(os.path.join(self.path, SUMMARY_FILE), metrics_lib.summary(markers))
    if record is not None and self.config.logging.tensorboard:
      if self._writer is None:
        self._writer = metrics_lib.TensorBoard(os.path.join(self.path, "tensorboard"))
      self._writer.write(record, steps_per_round=self.config.consolidation.steps)
    if self.config.logging.plot and (record is None or record["stage"] == "evaluate"):
      plots.plot_rounds(markers, os.path.join(self.path, "plots", "rounds.png"),
                        title=str(self.config.name))

  def summary(self) -> dict[str, Any]:
    """The run's summary.json as last published."""
    return read_json(os.path.join(self.path, SUMMARY_FILE))

  def close(self) -> None:
    """Closes the TensorBoard writer (a later `publish` opens a new one)."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
