"""The decoding engine: one thread that runs every request through continuous batching.

Requests come in from the web server's threads (`Engine.submit` returns a future). The engine
thread admits waiting requests into free rows of a `oel_jax.slots.SlotDecoder` and decodes a
chunk of steps for all its rows at once, so concurrent requests share decode steps; a reply
that ends frees its row for the next request while the others go on.

A decoder holds one set of sampling settings (temperature, top-p, top-k: `Sampling.decoder_key`),
so requests are grouped by them: each group gets its own decoder (up to ``max_groups`` at once;
an idle one makes room for a new group) and the engine decodes a chunk of each busy group in
turn. Every request has its own token budget and seed: with a seed, its tokens are those of
`Sampler.generate` on its prompt alone, whoever shares its decoder.

Hot swap (`Engine.swap`): the engine stops admitting, lets the requests in flight finish on the
weights they started with, swaps the new ones in, and admits again; requests that arrive
meanwhile wait, none fails, and no reply mixes two models. Each reply names its model.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from oel_jax.sampling import Sampler, bucket_size
from oel_jax.serve.protocol import Sampling
from oel_jax.serve.records import ServedModel
from oel_jax.slots import SlotDecoder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """How the engine batches."""

  slots: int = 8
  """Rows decoded at once per sampling group."""
  max_tokens: int = 1024
  """The most tokens a reply may have (each decoder's token columns)."""
  chunk_steps: int = 8
  """Decode steps per call (a finished row waits at most this many steps to be handed back
  and its row refilled)."""
  max_groups: int = 4
  """Sampling-settings groups decoded at once (each holds its own KV cache)."""


@dataclasses.dataclass(frozen=True)
class Generated:
  """A request's generated tokens."""

  tokens: list[int]
  """Generated ids, the stop token included when one was hit."""
  finish_reason: str
  """"stop" or "length"."""
  model: ServedModel
  """The model whose weights produced every token."""


@dataclasses.dataclass(frozen=True)
class _Job:
  prompt: list[int]
  sampling: Sampling
  seed: int
  future: Future


@dataclasses.dataclass(frozen=True)
class _Swap:
  new: Any  # a `Sampler` (another architecture) or a model whose weights replace the served
  model: ServedModel
  future: Future


class EngineStopped(RuntimeError):
  """The engine stopped before the request finished."""


class Engine:
  """Decodes submitted prompts in continuous batches on one thread (see the module docstring).

  Args:
    sampler: the served model's sampler (`Sampler.supports_slots`: on one device or a mesh).
    model: what replies record as their model.
    options: slots, token limit, chunk size and groups.
  """

  def __init__(self, sampler: Sampler, model: ServedModel, options: EngineOptions):
    if not sampler.supports_slots:
      raise ValueError(f"Engine: the sampler ({type(sampler).__name__}) does not support "
                       "slots (supports_slots is not True)")
    self.options = options
    self._sampler = sampler
    self._model = model
    self._cv = threading.Condition()
    self._inbox: list[_Job] = []
    self._swap: _Swap | None = None
    self._stopping = False
    self._waiting: collections.deque[_Job] = collections.deque()  # engine thread only
    self._decoders: dict[tuple, SlotDecoder] = {}
    self._owners: dict[tuple, dict[int, _Job]] = {}
    self._thread = threading.Thread(target=self._run, name="oel-serve-engine", daemon=True)
    self.stats = collections.Counter()
    """Prefill and decode calls: counts, seconds, rows (a row per request in each call)."""

  @property
  def model(self) -> ServedModel:
    """The model serving new requests now (the latest swapped in)."""
    return self._model

  @property
  def sampler(self) -> Sampler:
    """The sampler serving now."""
    return self._sampler

  def warm_up(self) -> Engine:
    """Compiles the programs the shortest prompts need before the engine starts: a prefill
    per batch bucket of requests admitted together (1, 2, 4, ... up to ``slots``) and the
    decode chunk. Longer prompts compile theirs on first use (once in the server's life)."""
    if self._thread.is_alive():
      raise RuntimeError("warm_up: call it before start")
    decoder = SlotDecoder(self._sampler, self.options.slots, max_new_tokens=self.options.max_tokens,
                          temperature=0.0, top_k=0, top_p=1.0, chunk_steps=1)
    n = 1
    while True:
      n = min(n, self.options.slots)
      decoder.start(list(range(n)), [[self._sampler.pad_id]] * n, [0] * n,
                    [min(2, self.options.max_tokens)] * n)
      while decoder.busy:
        decoder.run()
      if n == self.options.slots:
        return self
      n = bucket_size(n + 1, 1, self._sampler.buckets_per_doubling)

  def start(self) -> Engine:
    """Starts the engine thread."""
    self._thread.start()
    return self

  def stop(self) -> None:
    """Stops the engine thread; requests not finished fail with `EngineStopped`."""
    with self._cv:
      self._stopping = True
      self._cv.notify_all()
    if self._thread.is_alive():
      self._thread.join()

  def submit(self, prompt: list[int], sampling: Sampling, seed: int) -> Future:
    """Queues a prompt (token ids); the future gives its `Generated` reply."""
    future: Future = Future()
    with self._cv:
      if self._stopping:
        raise EngineStopped("the server is shutting down")
      self._inbox.append(_Job(list(prompt), sampling, int(seed), future))
      self._cv.notify_all()
    return future

  def swap(self, new: Any, model: ServedModel) -> Future:
    """Serves ``new`` from now on: a `Sampler` (another architecture: its programs compile on
    first use) or a model of the served architecture (only the weights change). The future is
    done once the swap happened: every request admitted after it uses the new weights."""
    future: Future = Future()
    with self._cv:
      if self._swap is not None:
        raise RuntimeError("a swap is already pending")
      self._swap = _Swap(new, model, future)
      self._cv.notify_all()
    return future

  # ---- the engine thread ----

  def _busy(self) -> bool:
    return any(d.busy for d in self._decoders.values())

  def _free_rows(self) -> bool:
    return any(d.busy < d.slots for d in self._decoders.values())

  def _run(self) -> None:
    try:
      while True:
        with self._cv:
          while not (self._stopping or self._inbox or self._swap or self._busy()
                     or self._waiting):
            self._cv.wait()
          if self._stopping:
            break
          arrived = bool(self._inbox)
          self._waiting.extend(self._inbox)
          self._inbox.clear()
          swap = self._swap
        if swap is not None and not self._busy():
          self._do_swap(swap)
          continue
        if swap is None:
          self._admit()
        # While requests keep arriving and rows are free, decode one step at a time so that
        # the next arrivals join at once (clients answered together come back together);
        # otherwise whole chunks, which spread each call's overhead over more tokens.
        self._decode(1 if arrived and self._free_rows() else None)
    except BaseException as e:  # pylint: disable=broad-except
      log.exception("the engine thread failed")
      self._fail_all(e)
      raise
    self._fail_all(EngineStopped("the server is shutting down"))

  def _fail_all(self, error: BaseException) -> None:
    with self._cv:
      self._stopping = True
      jobs = list(self._waiting) + self._inbox
      self._waiting.clear()
      self._inbox.clear()
      swap, self._swap = self._swap, None
    for owners in self._owners.values():
      jobs.extend(owners.values())
    self._owners.clear()
    for job in jobs:
      if not job.future.done():
        job.future.set_exception(error)
    if swap is not None:
      swap.future.set_exception(error)

  def _do_swap(self, swap: _Swap) -> None:
    try:
      if isinstance(swap.new, Sampler):
        self._sampler = swap.new
        self._decoders.clear()
        self._owners.clear()
      else:
        self._sampler.update_weights(swap.new)
      self._model = swap.model
    except BaseException as e:  # pylint: disable=broad-except
      with self._cv:
        self._swap = None
      swap.future.set_exception(e)
      return
    with self._cv:
      self._swap = None
    log.info("now serving %s (round %s)", swap.model.name, swap.model.round)
    swap.future.set_result(swap.model)

  def _decoder(self, key: tuple) -> SlotDecoder | None:
    """The decoder of a sampling group, made if there is room (an idle one may go)."""
    if key in self._decoders:
      return self._decoders[key]
    if len(self._decoders) >= self.options.max_groups:
      idle = next((k for k, d in self._decoders.items() if not d.busy), None)
      if idle is None:
        return None
      del self._decoders[idle]
      del self._owners[idle]
    temperature, top_p, top_k = key
    self._decoders[key] = SlotDecoder(
        self._sampler, self.options.slots, max_new_tokens=self.options.max_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, chunk_steps=self.options.chunk_steps)
    self._owners[key] = {}
    return self._decoders[key]

  def _admit(self) -> None:
    """Starts waiting requests in free rows, first come first served within each group."""
    starts: dict[tuple, list[tuple[int, _Job]]] = {}
    left: collections.deque[_Job] = collections.deque()
    for job in self._waiting:
      if job.future.cancelled():  # the client went away while it waited
        continue
      key = job.sampling.decoder_key
      decoder = self._decoder(key)
      taken = starts.setdefault(key, [])
      free = decoder.free_rows if decoder is not None else []
      if len(taken) >= len(free):
        left.append(job)
      elif job.future.set_running_or_notify_cancel():  # from here on it cannot be cancelled
        taken.append((free[len(taken)], job))
    self._waiting = left
    for key, started in starts.items():
      if not started:
        continue
      decoder = self._decoders[key]
      jobs = [job for _, job in started]
      try:
        t0 = time.perf_counter()
        decoder.start([row for row, _ in started], [j.prompt for j in jobs],
                      [j.seed for j in jobs], [j.sampling.max_tokens for j in jobs])
        self.stats["prefill_calls"] += 1
        self.stats["prefill_rows"] += len(jobs)
        self.stats["prefill_s"] += time.perf_counter() - t0
      except Exception as e:  # pylint: disable=broad-except
        for job in jobs:
          job.future.set_exception(e)
        continue
      self._owners[key].update(started)

  def _decode(self, steps: int | None = None) -> None:
    """One chunk of decode steps (``steps``, default ``chunk_steps``) for every busy group;
    hands the finished replies back."""
    for key, decoder in list(self._decoders.items()):
      if not decoder.busy:
        continue
      owners = self._owners[key]
      try:
        t0 = time.perf_counter()
        replies = decoder.run(steps)
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["decode_calls"] += 1
        self.stats["decode_rows"] += decoder.busy + len(replies)
      except Exception as e:  # pylint: disable=broad-except
        log.exception("decoding failed; failing the group's %d requests", len(owners))
        for job in owners.values():
          job.future.set_exception(e)
        del self._decoders[key]
        del self._owners[key]
        continue
      for reply in replies:
        owners.pop(reply.row).future.set_result(
            Generated(reply.tokens, reply.finish_reason, self._model))
