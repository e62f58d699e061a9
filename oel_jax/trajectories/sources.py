"""Recorded experience for the loop: trajectory files by glob, and a serve workdir's log.

`expand_files` turns ``config.collect.trajectory_files`` (a glob, or several separated by
commas) into files; `read_recorded` reads them and the serve log into one list of
trajectories, leaving out files whose contents an earlier round read (by SHA-256) and served
requests at or before an earlier cut-off, as `oel_jax.stages.collect` asks.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from collections.abc import Collection
from typing import Any

from oel_jax.envs import Trajectory, load_trajectories
from oel_jax.errors import InputError
from oel_jax.trajectories.served import load_served


def patterns(spec: str) -> list[str]:
  """The globs of a comma-separated list (blank entries dropped)."""
  return [p.strip() for p in spec.split(",") if p.strip()]


def expand_files(spec: str, *, field: str = "trajectory_files") -> list[str]:
  """The files ``spec``'s globs match: each glob's matches sorted, in the globs' order, each
  file once (``~`` expanded; ``**`` matches folders recursively).

  Raises:
    InputError: a glob matches no file (named with ``field``).
  """
  out: list[str] = []
  for pattern in patterns(spec):
    matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(p))
    if not matches:
      raise InputError(f"{field}: {pattern!r} matches no file")
    out.extend(p for p in matches if p not in out)
  return out


def file_digest(path: str) -> str:
  """The SHA-256 of a file's bytes (hex)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Recorded:
  """What one collect read: the trajectories and where they came from."""

  trajectories: list[Trajectory]
  """Trajectory files' records in file order, then the serve log's conversations."""

  files: list[dict[str, Any]]
  """Per matched file: ``path``, ``sha256``, ``trajectories`` read (0 and ``skipped``
  True when an earlier round read the same contents)."""

  served: dict[str, Any] | None
  """The serve log's counts and cut-offs (`oel_jax.trajectories.ServedLog`), or None."""


def read_recorded(files_spec: str, served_workdir: str, *, until: float | None,
                  after: float | None = None, read_before: Collection[str] = ()
                  ) -> Recorded:
  """Reads recorded experience.

  Args:
    files_spec: trajectory files: globs separated by commas ("" for none).
    served_workdir: a serve workdir ("" for none).
    until: the serve log's cut-off (None: all).
    after: read only served requests created after this (None: from the start).
    read_before: SHA-256 digests of files an earlier round read: skipped.

  Raises:
    InputError: a glob matching nothing, a malformed file or log line (by file and line).
  """
  trajectories: list[Trajectory] = []
  files = []
  for path in expand_files(files_spec) if files_spec else []:
    digest = file_digest(path)
    if digest in read_before:
      files.append({"path": path, "sha256": digest, "trajectories": 0, "skipped": True})
      continue
    records = load_trajectories(path)
    trajectories.extend(records)
    files.append({"path": path, "sha256": digest, "trajectories": len(records),
                  "skipped": False})
  served = None
  if served_workdir:
    log = load_served(served_workdir, until, after=after)
    trajectories.extend(log.trajectories)
    served = {"workdir": served_workdir, "until": until, "after": after,
              "conversations": len(log.trajectories), "requests": log.requests,
              "outside": log.outside, "with_feedback": log.feedback,
              "unmatched_feedback": log.unmatched_feedback, "truncated": log.truncated}
  return Recorded(trajectories=trajectories, files=files, served=served)
