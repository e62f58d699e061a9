"""Where the K accumulation runs stand (`ExtractionState`), as JSON data.

Also what fixes a run before it starts: the trajectory pool, each run's order in it, and each
step's sampling seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oel_jax.envs.trajectory import Trajectory, load_trajectories
from oel_jax.experience.config import ExtractionConfig

STATE_KIND = "oel_jax.extraction_state"
STATE_VERSION = 1


def load_pool(*paths: str | os.PathLike[str]) -> list[Trajectory]:
  """Reads trajectory files (JSONL) into one pool, in the order given."""
  pool: list[Trajectory] = []
  for path in paths:
    pool.extend(load_trajectories(path))
  return pool


def pool_digest(pool: Sequence[Trajectory]) -> str:
  """SHA-256 of the pool's records in order (what a resumed run checks it reads the same)."""
  h = hashlib.sha256()
  for trajectory in pool:
    h.update(trajectory.to_json().encode("utf-8"))
    h.update(b"\n")
  return h.hexdigest()


def plan_orders(pool_size: int, config: ExtractionConfig) -> tuple[tuple[int, ...], ...]:
  """Each run's n trajectory indices into the pool, in reading order (see `pool_order`).

  Raises:
    ValueError: the pool holds fewer trajectories than the runs need.
  """
  n, k = config.num_trajectories, config.num_runs
  if config.pool_order == "chunks":
    if pool_size < n * k:
      raise ValueError(f"pool_order='chunks' needs num_runs * num_trajectories = {k} * {n} = "
                       f"{n * k} trajectories; the pool holds {pool_size}")
    return tuple(tuple(range(r * n, (r + 1) * n)) for r in range(k))
  if pool_size < n:
    raise ValueError(f"num_trajectories={n} but the pool holds only {pool_size} trajectories")
  return tuple(
      tuple(int(i) for i in np.random.default_rng([config.seed, r]).permutation(pool_size)[:n])
      for r in range(k))


def step_seed(seed: int, step: int) -> int:
  """The sampling seed of accumulation step ``step`` (shared by the K runs' batched call)."""
  return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class ExtractionState:
  """Where K accumulation runs stand: everything needed to continue them, as JSON data."""

  config: ExtractionConfig
  """The stage's settings."""

  orders: tuple[tuple[int, ...], ...]
  """Per run, the pool indices of its n trajectories in reading order."""

  pool_size: int
  """Trajectories in the pool the orders index."""

  pool_digest: str
  """`pool_digest` of that pool ("" when unknown)."""

  step: int = 0
  """Accumulation steps done (0..n); step ``i`` reads ``orders[k][i]`` in every run ``k``."""

  knowledge: tuple[str, ...] = ()
  """Per run, the knowledge accumulated so far (after truncation); () means all "" (start)."""

  history: tuple[Mapping[str, Any], ...] = ()
  """One JSON record per step done: ``{"step", "seed", "runs": [per-run stats]}``. Per run:
  ``trajectory`` (pool index), ``items`` (new items kept; lines for unstructured), ``empty``,
  ``unterminated_reasoning``, ``finish_reason`` and ``response_tokens`` (None when the
  generator gave plain text), ``knowledge_tokens`` and ``knowledge_items`` (after truncation),
  ``dropped_items`` (items truncation removed this step)."""

  def __post_init__(self):
    k, n = self.config.num_runs, self.config.num_trajectories
    orders = tuple(tuple(int(i) for i in order) for order in self.orders)
    object.__setattr__(self, "orders", orders)
    if not self.knowledge:
      object.__setattr__(self, "knowledge", ("",) * k)
    object.__setattr__(self, "knowledge", tuple(self.knowledge))
    object.__setattr__(self, "history", tuple(self.history))
    if len(orders) != k or any(len(order) != n for order in orders):
      raise ValueError(f"ExtractionState.orders must hold num_runs={k} orders of "
                       f"num_trajectories={n} indices")
    if any(not 0 <= i < self.pool_size for order in orders for i in order):
      raise ValueError(f"ExtractionState.orders index outside the pool [0, {self.pool_size})")
    if len(self.knowledge) != k or not all(isinstance(t, str) for t in self.knowledge):
      raise ValueError(f"ExtractionState.knowledge must hold num_runs={k} strings")
    if not 0 <= self.step <= n:
      raise ValueError(f"ExtractionState.step must be in [0, {n}], got {self.step}")
    if len(self.history) != self.step:
      raise ValueError(f"ExtractionState.history has {len(self.history)} records for "
                       f"{self.step} steps")

  @property
  def done(self) -> bool:
    """Whether every run has read all its trajectories."""
    return self.step >= self.config.num_trajectories

  def to_dict(self) -> dict[str, Any]:
    """The state as JSON data."""
    return {"kind": STATE_KIND, "version": STATE_VERSION, "config": self.config.to_dict(),
            "orders": [list(o) for o in self.orders], "pool_size": self.pool_size,
            "pool_digest": self.pool_digest, "step": self.step,
            "knowledge": list(self.knowledge), "history": [dict(h) for h in self.history]}

  def to_json(self) -> str:
    """The state as one JSON document."""
    return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> ExtractionState:
    """Rebuilds a state from `to_dict` data; raises ValueError naming what is wrong."""
    if not isinstance(data, Mapping) or data.get("kind") != STATE_KIND:
      raise ValueError(f"not an extraction state (expected kind {STATE_KIND!r})")
    if data.get("version") != STATE_VERSION:
      raise ValueError(f"extraction state version {data.get('version')!r} is not supported "
                       f"(expected {STATE_VERSION})")
    missing = [key for key in ("config", "orders", "pool_size", "pool_digest", "step",
                               "knowledge", "history") if key not in data]
    if missing:
      raise ValueError(f"extraction state lacks field(s) {missing}")
    try:
      return cls(config=ExtractionConfig.from_dict(data["config"]),
                 orders=tuple(tuple(o) for o in data["orders"]),
                 pool_size=int(data["pool_size"]), pool_digest=str(data["pool_digest"]),
                 step=int(data["step"]), knowledge=tuple(data["knowledge"]),
                 history=tuple(data["history"]))
    except (TypeError, ValueError) as e:
      raise ValueError(f"invalid extraction state: {e}") from None

  @classmethod
  def from_json(cls, text: str) -> ExtractionState:
    """Parses `to_json` output."""
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"extraction state is not valid JSON: {e}") from None
    return cls.from_dict(data)


def start_extraction(pool: Sequence[Trajectory], config: ExtractionConfig,
                     orders: Sequence[Sequence[int]] | None = None) -> ExtractionState:
  """The state before the first step: empty knowledge, each run's order planned.

  Args:
    pool: the trajectories to read.
    config: the stage's settings.
    orders: each run's pool indices, overriding `plan_orders` (K lists of n indices).
  """
  if orders is None:
    orders = plan_orders(len(pool), config)
  return ExtractionState(config=config, orders=tuple(tuple(o) for o in orders),
                         pool_size=len(pool), pool_digest=pool_digest(pool))
