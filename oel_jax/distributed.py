"""One program on one process or several: starting the job, checking that its processes
agree, and the one process that writes the run's files.

    process = distributed.start(coordinator_address, num_processes, process_id)
    distributed.check_agreement({"config": config_json, "code": code_version()})

    @distributed.writer_only
    def write_report(path, data): ...          # process 0 writes; the others wait, then read

`start` is the first thing a run does, before any computation. With the three arguments
given, the process joins that job (`jax.distributed.initialize`). With none given, a cluster
that JAX detects by itself (a TPU pod slice, SLURM, Open MPI, ...) is joined; with no such
cluster the run stays one process. With more than one process on CPU, collectives go through
gloo (XLA:CPU has no other cross-process implementation), so a job of several local processes
on 127.0.0.1 runs the same programs a pod slice does.

Every process runs the same Python control flow and the same global programs; the run's
files are written once, by process 0 (`writer_only`), into a folder every process sees (a
shared file system). The other processes skip each write and wait for it at a barrier, so
that whatever they read next (a done-file, a checkpoint to load) is there. orbax checkpoints
are the exception: every process saves and restores its own shards, as orbax expects.

A process that dies stops the others within a bounded time, with one line naming it:

    error: process 0 of 2: process 1 has given no sign of life for 60 s (it died or hangs); ...

Each process's watchdog thread (`start`) posts a heartbeat to the job's key-value store
(on process 0's coordinator) every few seconds and reads everyone's; a process whose
heartbeat has not moved for ``peer_timeout_s`` is taken for dead, and one that stopped on an
error (`stop`) is named at once. Either way the watchdog prints that line and ends its own
process (exit 1, skipping JAX's shutdown barrier, which would wait for the dead). Without it
(JAX 0.10.2 on CPU, measured) a survivor stuck in a collective, or busy between two, was
ended only by JAX's heartbeat timeout (100 s by default) with SIGABRT and a C++ stack trace;
one whose gloo collective failed at once (the peer's socket closed) printed that error and
then waited at the shutdown barrier for as long. JAX's heartbeat, now at twice the peer
timeout, remains the backstop should the watchdog thread ever be starved. Process 0 runs the
key-value store: when it dies, JAX itself ends the others within about a second (SIGABRT,
"Terminating process because the JAX distributed service detected fatal errors ... another
task died"), before any watchdog can say more. A run that ends well says so (`finish`), so
that its exit alarms no one.
"""

from __future__ import annotations

import atexit
import contextvars
import dataclasses
import functools
import hashlib
import logging
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeVar

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # its client: the job's key-value store
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

T = TypeVar("T")

# What jax.distributed.initialize says when asked to detect a cluster and none is there.
_NO_CLUSTER = "coordinator_address should be defined"
# What it says when JAX's backend already runs in this process.
_BACKEND_STARTED = "must be called before any JAX calls"

DEFAULT_PEER_TIMEOUT_S = 100
"""How long a process may give no sign of life before the others stop: JAX's own default
heartbeat timeout, long enough for a pod's hosts under load."""


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
          process_id: int | None = None, *, timeout_s: int = 300,
          peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S) -> Process:
  """Joins the job (see the module docstring) and returns this process's place in it.

  Args:
    coordinator_address: ``HOST:PORT`` of process 0's coordinator service.
    num_processes: processes in the job.
    process_id: this process's index, in ``[0, num_processes)``.
    timeout_s: how long to wait for the other processes to join.
    peer_timeout_s: how long another process may give no sign of life before this one
      stops (see the module docstring).

  Raises:
    ValueError: some but not all of the three are given, or one is invalid.
  """
  _check(coordinator_address, num_processes, process_id)
  if isinstance(peer_timeout_s, bool) or not isinstance(peer_timeout_s, (int, float)) \
      or not peer_timeout_s >= 1:
    raise ValueError(f"--peer_timeout must be a number of seconds >= 1, got {peer_timeout_s!r}")
  if num_processes == 1:
    return _process()
  # Only the CPU client reads it, and it must be set before that client exists.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's heartbeat only backs the watchdog up: it ends the process without naming the
  # dead one (and a dead non-coordinator only after this timeout).
  backstop = dict(initialization_timeout=timeout_s,
                  heartbeat_timeout_seconds=int(2 * peer_timeout_s))
  if coordinator_address is None:
    try:
      jax.distributed.initialize(**backstop)
    except ValueError as e:
      if _NO_CLUSTER not in str(e):
        raise
      log.info("no cluster detected: one process")
    except RuntimeError as e:
      # JAX already ran in this process (a notebook, a test), so no cluster can be joined
      # any more; with no arguments given, that is a run of one process.
      if _BACKEND_STARTED not in str(e):
        raise
      log.warning("JAX was in use before distributed.start: no cluster detection; one process")
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **backstop)
  if _several():
    _Watchdog.begin(peer_timeout_s)
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
  ``values`` (e.g. ``{"config.seed": "0", "code": code_version()}``).

  Only digests travel: first one of all the keys and one of all the values (so processes
  that compare different sets of keys get a clear error, not a collective of mismatched
  sizes), then, when the values differ, one per key to name those that differ. One process:
  nothing to compare.

  Raises:
    DisagreementError: on every process, naming each key that differs, this process's
      value of it when short, and each process's digest of it.
  """
  if not _several():
    return
  keys = sorted(values)
  width = 32  # bytes of a sha256 digest

  def gather(texts: list[str]) -> np.ndarray:  # [P, width * len(texts)]
    mine = np.frombuffer(b"".join(bytes.fromhex(digest(t)) for t in texts), np.uint8)
    return np.asarray(multihost_utils.process_allgather(mine))

  whole = gather(["\n".join(keys), "\n".join(values[k] for k in keys)])
  if (whole == whole[0]).all():
    return
  problems = []
  if not (whole[:, :width] == whole[0, :width]).all():
    problems.append(f"the processes compare different sets of values ({len(keys)} here), as "
                    "processes running different code would")
  else:
    every = gather([values[k] for k in keys])
    for i, key in enumerate(keys):
      column = every[:, i * width:(i + 1) * width]
      if not (column == column[0]).all():
        here = f"this process: {values[key]}; " if len(values[key]) <= 80 else ""
        shown = ", ".join(f"process {p}: {column[p].tobytes().hex()[:12]}"
                          for p in range(len(column)))
        problems.append(f"{key} differs ({here}digests {shown})")
  raise DisagreementError(
      f"process {jax.process_index()} of {jax.process_count()}: the processes were not "
      "started alike: " + "; ".join(problems) +
      ". Start every process with the same command, config and code.")


def code_version() -> str:
  """A digest of the oel_jax package as installed: every file under its folder (sources,
  prompts, the tiny tokenizer), by relative path and content.

  Works the same from a git checkout and from a pip install (no git needed), and changes
  with any edit, committed or not, which a version string or ``git describe`` would miss.
  """
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
    for name in sorted(files):
      if name.endswith((".pyc", ".pyo")):
        continue
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode("utf-8") + b"\0")
      with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# One writer.


def _several() -> bool:
  # Without jax.distributed there is one process; asking JAX for the count would start its
  # backend, which a plain file write (a test, a script) has no reason to do.
  return jax.distributed.is_initialized() and jax.process_count() > 1


def is_writer() -> bool:
  """Whether this process writes the run's files: process 0, or the only one."""
  return not _several() or jax.process_index() == 0


class WriterError(RuntimeError):
  """Process 0 failed to write a file of the run; raised on the other processes."""


def barrier(name: str, *, failed: bool = False) -> bool:
  """Waits until every process has reached the barrier ``name``; returns whether any of them
  arrived ``failed``. One process: returns ``failed`` at once.

  What `multihost_utils.sync_global_devices` does, plus one flag, so that an error on one
  process stops the others instead of leaving them to wait for something that never comes.

  Raises:
    DisagreementError: the processes reached different barriers (their control flow
      diverged), naming this process's.
  """
  if not _several():
    return failed
  mine = np.asarray([zlib.crc32(name.encode("utf-8")), int(failed)], np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine))  # [P, 2]
  if not (every[:, 0] == mine[0]).all():
    raise DisagreementError(
        f"process {jax.process_index()} of {jax.process_count()} is at barrier {name!r} and "
        "another process at a different one: the processes' control flow diverged")
  return bool(every[:, 1].any())


# Set while process 0 runs a `writer_only` function: a writer it calls runs as a plain call
# (the other processes are not running the outer one, so they would never meet its barrier).
_WRITING: contextvars.ContextVar[bool] = contextvars.ContextVar("oel_jax_writing", default=False)


def writer_only(write: Callable[..., T]) -> Callable[..., T | None]:
  """Makes ``write``, a function that writes files of the run, run on process 0 only.

  Every process calls the decorated function at the same point of the same control flow.
  Process 0 runs it once every process has got there, and the others wait until it has
  returned: so every process sees the files as a single process would, each write there for
  every read after it and for none before it (a process that looked for a file just before
  its write could otherwise find it already written, and take another branch). It returns
  what ``write`` returned on process 0 and None on the others. An exception in ``write`` is
  raised on process 0 and, as a `WriterError` naming the function, on the others. One
  process: a plain call.

  ``write`` must not run a collective (a computation over the mesh): the other processes
  would not be there to take part. A writer that needs one (exporting a sharded model
  gathers each tensor) runs it on every process and puts only the writing in here.
  """
  name = f"{write.__module__}.{write.__qualname__}"

  @functools.wraps(write)
  def run_on_writer(*args: Any, **kwargs: Any) -> T | None:
    if _WRITING.get() or not _several():
      return write(*args, **kwargs)
    result, error = None, None
    barrier(f"{name} (start)")
    if jax.process_index() == 0:
      token = _WRITING.set(True)
      try:
        result = write(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except
        error = e
      finally:
        _WRITING.reset(token)
    failed = barrier(f"{name} (end)", failed=error is not None)
    if error is not None:
      raise error
    if failed:
      raise WriterError(f"process 0 failed in {name} (its log says why); process "
                        f"{jax.process_index()} stops too")
    return result

  return run_on_writer


# ---------------------------------------------------------------------------------------------
# A process that dies or stops on an error stops the others.


# + process index: "beat <n>", "done", or "stopped <cause>", the cause as the others name it
# ("process 2 has given no sign of life for 60 s (it died or hangs)"), so that every
# process of a larger job names the one that died, not the first that stopped because of it.
_ALIVE = "oel_jax/alive/"


def _say(line: str) -> None:
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)


class _Watchdog:
  """This process's heartbeat in the job's key-value store, and its watch over the others'."""

  current: _Watchdog | None = None

  def __init__(self, peer_timeout_s: float):
    self.client = jax_distributed.global_state.client
    self.index, self.count = jax.process_index(), jax.process_count()
    self.timeout_s = float(peer_timeout_s)
    # Ten looks per timeout, but no faster than every half second nor slower than every 5.
    self.interval_s = min(5.0, max(0.5, self.timeout_s / 10))
    self.failing = threading.Event()  # this process is stopping on an error of its own
    self.finished = threading.Event()
    self.lock = threading.Lock()      # whichever thread ends the process holds it
    self.states: dict[int, str] = {}  # the others' last posts
    self.lost: set[int] = set()       # processes taken for dead

  @classmethod
  def begin(cls, peer_timeout_s: float) -> None:
    cls.current = watchdog = cls(peer_timeout_s)
    watchdog.post("beat 0")
    watchdog.thread = threading.Thread(target=watchdog.watch, name="oel_jax-watchdog",
                                       daemon=True)
    watchdog.thread.start()
    # Before JAX's own clean-up (registered when jax was imported, so run after this): a
    # process that reaches the end of its program has finished, whether or not it said so.
    atexit.register(finish)

  def post(self, state: str) -> None:
    self.client.key_value_set(f"{_ALIVE}{self.index}", state, allow_overwrite=True)

  def read(self) -> dict[int, str]:
    return {int(key.rpartition("/")[2]): value
            for key, value in self.client.key_value_dir_get(_ALIVE)}

  def stopped_cause(self) -> str | None:
    """Why another process stopped, as it named it, if one has."""
    for p, state in sorted(self.states.items()):
      if p != self.index and state.startswith("stopped "):
        return state[len("stopped "):]
    return None

  def watch(self) -> None:
    beat, heard = 0, {p: ("", time.monotonic()) for p in range(self.count) if p != self.index}
    while not self.finished.wait(self.interval_s):
      beat += 1
      try:
        self.post(f"beat {beat}")
        self.states = self.read()
      except Exception as e:  # pylint: disable=broad-except
        if not self.finished.is_set():
          first = str(e).splitlines()[0] if str(e) else ""
          self.end("process 0, which runs the job's coordinator, cannot be reached "
                   f"({type(e).__name__}: {first})")
        return
      cause = self.stopped_cause()
      # Another process stopped: unless this one is stopping on its own error, whose
      # main thread may be raising the same error (then it names it), give it a moment.
      if cause and not self.failing.is_set() and not self.failing.wait(min(self.interval_s, 1)):
        self.end(cause)
      now = time.monotonic()
      for p, (last, since) in heard.items():
        state = self.states.get(p, "")
        if state != last:
          heard[p] = (state, now)
        elif not state.startswith(("done", "stopped")) and now - since > self.timeout_s:
          self.lost.add(p)
          self.end(f"process {p} has given no sign of life for {now - since:.0f} s "
                   "(it died or hangs)")

  def end(self, cause: str, code: int = 1, line: str | None = None) -> NoReturn:
    """Ends this process because of ``cause`` (another process's end, as the others will
    name it too) or, given ``line``, an error of its own: prints ``error: <line>``, tells the
    others, and exits without the shutdown barrier of `jax.distributed` (which would wait
    for processes that are gone)."""
    with self.lock:  # never released: the process ends here
      if line is None:
        line = (f"process {self.index} of {self.count}: {cause}; this process stops too. "
                "Re-run the same command on every host to resume from the last checkpoint")
      _say(f"error: {line}")
      self.leave(f"stopped {cause}")
      os._exit(code)  # pylint: disable=protected-access

  def leave(self, state: str) -> None:
    try:
      self.post(state)
    except Exception:  # pylint: disable=broad-except
      return  # the coordinator is gone: nobody is left to tell
    if self.index != 0:
      return
    # Process 0 runs the key-value store: when it ends, JAX ends the others at once, with
    # its own message. So it waits (a few of their looks at most) until each has seen it
    # go and said why it stops itself.
    deadline = time.monotonic() + 3 * self.interval_s + 1
    while time.monotonic() < deadline:
      try:
        states = self.read()
      except Exception:  # pylint: disable=broad-except
        return
      if all(states.get(p, "").startswith(("stopped", "done")) or p in self.lost
             for p in range(1, self.count)):
        return
      time.sleep(0.1)


def stop(line: str, code: int, *, peer_may_be_the_cause: bool = False) -> NoReturn:
  """Ends this process on an error, with ``error: <line>`` and exit ``code``; in a job of
  several, after telling the others, which stop too, naming this one.

  ``peer_may_be_the_cause``: the error may come from another process that died or stopped
  (a collective that failed): first wait, up to the peer timeout, for the watchdog to find
  such a process, and then stop naming that one instead.
  """
  watchdog = _Watchdog.current
  if watchdog is None:
    _say(f"error: {line}")
    sys.exit(code)
  watchdog.failing.set()
  if peer_may_be_the_cause:
    deadline = time.monotonic() + watchdog.timeout_s + 2 * watchdog.interval_s
    others = [p for p in range(watchdog.count) if p != watchdog.index]
    while time.monotonic() < deadline and watchdog.thread.is_alive():
      cause = watchdog.stopped_cause()
      if cause:
        watchdog.end(cause, code)
      if all(watchdog.states.get(p) == "done" for p in others):
        break  # the others are fine: the error is this process's own
      time.sleep(0.1)
  watchdog.end(f"process {watchdog.index} stopped on an error (its log says which)", code,
               line)


def finish() -> None:
  """Tells the other processes that this one has finished its work (its exit is no sign of
  trouble), and stops watching them. Called at the end of a successful run (and at exit)."""
  watchdog = _Watchdog.current
  if watchdog is None or watchdog.finished.is_set():
    return
  watchdog.finished.set()
  watchdog.thread.join()
  try:
    watchdog.post("done")
  except Exception:  # pylint: disable=broad-except
    pass
