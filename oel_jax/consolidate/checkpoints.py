"""Checkpoints and metrics files of a consolidation run, and what a resume must match.

With a workdir, orbax checkpoints of the train state plus JSON metadata (step, data position,
the metrics so far and a fingerprint of the config and inputs) are written to
``workdir/checkpoints`` (`open_workdir`); `restore` continues from the latest one when the
fingerprint agrees, and `start_state` from it or from a fresh train state.

On several processes every process saves and restores the checkpoints (each its own shards;
orbax has process 0 write the metadata and finalise each one); the metrics file is process
0's alone (`write_metrics`, `append_metrics`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from oel_jax import distributed
from oel_jax.atomic_write import atomic_write_text
from oel_jax.consolidate.config import ConsolidationConfig
from oel_jax.consolidate.inputs import Prefix
from oel_jax.models.qwen3 import Qwen3
from oel_jax.train import Trainer, TrainState

_log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
META_KIND = "oel_jax.consolidation_checkpoint"
META_VERSION = 1

TIMING_KEYS = ("sampling_time", "train_time", "step_time", "tokens_per_second",
               "sampled_tokens_per_second")
"""Metrics that measure time (they differ between otherwise identical runs)."""

RESUMABLE_FIELDS = ("steps", "checkpoint_every", "keep_checkpoints",
                    "max_consecutive_skipped_steps", "teacher_prefix_cache")
"""Config fields that may change between an interrupted run and its resumption."""


def digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode("utf-8")).hexdigest()


def prefix_digest(prefixes: Sequence[Prefix], ids: Mapping[int, Sequence[int]]) -> str:
  """Digest of the prefixes' places and their rendered token ids (tokenizer and template)."""
  h = hashlib.sha256()
  for i, p in enumerate(prefixes):
    h.update(np.asarray([p.game, p.turn, len(ids[i])], np.int64).tobytes())
    h.update(np.asarray(ids[i], np.int64).tobytes())
  return h.hexdigest()


def metrics_line(m: Mapping[str, Any]) -> str:
  return json.dumps(m, allow_nan=False) + "\n"


@distributed.writer_only
def write_metrics(path: str, history: Sequence[Mapping[str, Any]]) -> None:
  """Replaces the metrics file with ``history``'s lines, atomically (on process 0)."""
  atomic_write_text(path, "".join(metrics_line(m) for m in history))


@distributed.writer_only
def append_metrics(path: str, line: Mapping[str, Any]) -> None:
  """Appends one step's line to the metrics file (on process 0)."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(metrics_line(line))


def json_number(value: Any) -> Any:
  """A metrics-line value: a non-finite float (a skipped step's loss) becomes None (null)."""
  return None if isinstance(value, float) and not math.isfinite(value) else value


def skip_counts(history: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
  """(skipped steps, skipped steps in a row at the end) of a metrics history."""
  flags = [bool(m.get("skipped", False)) for m in history]  # older lines lack the key
  run = len(flags) - max((i + 1 for i, f in enumerate(flags) if not f), default=0)
  return sum(flags), run


def too_many_skipped(step: int, consecutive: int, m: Mapping[str, Any],
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


class Checkpoints:
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


def restore(checkpoints: Checkpoints, fingerprint: Mapping[str, Any],
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


def open_workdir(workdir: str | os.PathLike[str] | None, config: ConsolidationConfig
                 ) -> tuple[Checkpoints | None, str | None]:
  """The checkpoints and metrics file of ``workdir`` (made if missing); (None, None) without."""
  if workdir is None:
    return None, None
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  return (Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints),
          os.path.join(workdir, METRICS_FILE))


def start_state(checkpoints: Checkpoints | None, metrics_path: str | None,
                fingerprint: Mapping[str, Any], config: ConsolidationConfig, trainer: Trainer,
                student: Qwen3) -> tuple[TrainState, list[dict[str, Any]], int]:
  """The (state, metrics history, step) a run starts from: the latest checkpoint's, or fresh.

  On a resume the metrics file is rewritten to the checkpoint's steps.
  """
  state, history, start = None, [], 0
  if checkpoints is not None:
    state, history, start = restore(checkpoints, fingerprint, config,
                                    lambda: abstract_state(trainer, student))
    write_metrics(metrics_path, history)
  if state is None:
    state = trainer.init_state(student)
  if trainer.mesh is None:
    # Committed like a restored state, so that a fresh and a resumed run share one compiled
    # step (jit keys its programs on whether the arguments are committed to a device).
    state = jax.device_put(state, jax.devices()[0])
  return state, history, start
