"""Starting JAX on one process or several: the first thing a run does, before any computation.

    process = distributed.start(coordinator_address, num_processes, process_id)

With the three given, the process joins that job (`jax.distributed.initialize`). With none
given, a cluster that JAX detects by itself (a TPU pod slice, SLURM, Open MPI, ...) is
joined; with no such cluster the run stays one process. With more than one process on CPU,
collectives go through gloo (XLA:CPU has no other cross-process implementation), so a job of
several local processes on 127.0.0.1 runs the same programs a pod slice does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# What jax.distributed.initialize says when asked to detect a cluster and none is there.
_NO_CLUSTER = "coordinator_address should be defined"


@dataclasses.dataclass(frozen=True)
class Process:
  """This process's place in the job, as JAX sees it after `start`."""

  index: int
  """`jax.process_index()`: 0 is the one that writes the run's files."""
  count: int
  """`jax.process_count()`."""
  local_devices: int
  """Devices this process drives."""
  devices: int
  """Devices of the whole job."""

  @property
  def is_writer(self) -> bool:
    """Whether this process writes the run's files (process 0)."""
    return self.index == 0


def _check(coordinator_address: str | None, num_processes: int | None,
           process_id: int | None) -> None:
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together: "
                     f"got coordinator_address={coordinator_address!r}, "
                     f"num_processes={num_processes!r}, process_id={process_id!r}")
  if not any(given):
    return
  host, _, port = coordinator_address.rpartition(":") if isinstance(coordinator_address, str) \
      else ("", "", "")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}")
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"--num_processes must be an integer >= 1, got {num_processes!r}")
  if isinstance(process_id, bool) or not isinstance(process_id, int) \
      or not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be an integer in [0, {num_processes}), got "
                     f"{process_id!r}")


def start(coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, *, timeout_s: int = 300) -> Process:
  """Joins the job (see the module docstring) and returns this process's place in it.

  Args:
    coordinator_address: ``HOST:PORT`` of process 0's coordinator service.
    num_processes: processes in the job.
    process_id: this process's index, in ``[0, num_processes)``.
    timeout_s: how long to wait for the other processes to join.

  Raises:
    ValueError: some but not all of the three are given, or one is invalid.
  """
  _check(coordinator_address, num_processes, process_id)
  if num_processes == 1:
    return _process()
  # Only the CPU client reads it, and it must be set before that client exists.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is None:
    try:
      jax.distributed.initialize(initialization_timeout=timeout_s)
    except ValueError as e:
      if _NO_CLUSTER not in str(e):
        raise
      log.info("no cluster detected: one process")
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  return _process()


def _process() -> Process:
  return Process(index=jax.process_index(), count=jax.process_count(),
                 local_devices=jax.local_device_count(), devices=jax.device_count())


class DisagreementError(RuntimeError):
  """The processes of one job were started with different settings or code."""


def digest(text: str) -> str:
  """The sha256 of ``text`` (UTF-8), hex: what processes compare instead of the text."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_agreement(values: Mapping[str, str]) -> None:
  """Stops every process of the job, naming what differs, unless all hold the same
  ``values`` (e.g. ``{"config": resolved config JSON, "code": version}``).

  Every process must call it with the same keys, in any order; only digests travel. One
  process: nothing to compare.

  Raises:
    DisagreementError: on every process, naming each key that differs and each process's
      digest of it.
  """
  if jax.process_count() == 1:
    return
  keys = sorted(values)
  # One 32-byte digest per value, then one of the key names.
  mine = np.frombuffer(b"".join(bytes.fromhex(digest(text))
                                for text in [values[k] for k in keys] + ["\n".join(keys)]),
                       np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine))  # [P, 32 * (len(keys) + 1)]
  if (every == every[0]).all():
    return
  width = 32
  problems = []
  if not (every[:, -width:] == every[0, -width:]).all():
    problems.append(f"the keys compared differ (this process: {keys})")
  else:
    for i, key in enumerate(keys):
      column = every[:, i * width:(i + 1) * width]
      if not (column == column[0]).all():
        shown = ", ".join(f"process {p}: {column[p].tobytes().hex()[:12]}"
                          for p in range(len(column)))
        problems.append(f"{key} differs ({shown})")
  raise DisagreementError(
      f"process {jax.process_index()} of {jax.process_count()}: the processes were not "
      "started alike: " + "; ".join(problems) +
      ". Start every process with the same command, config and code.")
