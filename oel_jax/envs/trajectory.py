"""Trajectory records and files: the boundary between the user side and the server side.

A trajectory file is JSON Lines: one JSON object per line, one trajectory per object, UTF-8.
The format is documented by the JSON Schema shipped next to this module
(``trajectory.schema.json``, see `schema()`); `oel_jax.envs.trajectory_format` validates
records by hand, field by field, and agrees with that schema (``tests/test_trajectory.py``
checks the two against each other). This module holds the records and their files, and
re-exports the format's names (`FIELDS`, `validate_record`, ...) where they have always been
imported from. A record:

    {"version": 1,
     "env": {"id": "frozenlake", "settings": {"size": 3, ...}},
     "seed": 7,                                     # optional, null for real deployments
     "model": {"name": "Qwen/Qwen3-1.7B", "round": 1},
     "turns": [{"observation": ..., "prompt": ..., "response": ...,
                "action": "[up]", "metadata": {},
                "content": ..., "prompt_format": "oel_game"}, ...],   # optional pair
     "final_feedback": "Summary:\\nFinal Result: Success\\n...",
     "outcome": {"success": true, "reward": 1.0, "reason": "..."},   # optional, may be null
     "metadata": {}}                                # optional, free-form

Reading streams (`read_trajectories` is an iterator) and fails on the first malformed line
with `TrajectoryFormatError`, whose message names the file, the line number and the field
(``runs/t.jsonl:12: turns[3].response: expected a string, got an integer``). Writing is
atomic (`TrajectoryWriter`, `write_trajectories`): records go to a temporary file in the
destination's folder, which is renamed over the destination only when every record was
written; on any error the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from oel_jax import distributed
from oel_jax.atomic_write import AtomicFile
from oel_jax.envs.trajectory_format import (
    FIELDS,
    FORMAT_VERSION,
    SCHEMA_FILE,
    TrajectoryFormatError,
    json_data,
    parse_json,
    schema,
    validate_record,
)

__all__ = [
    "FIELDS", "FORMAT_VERSION", "SCHEMA_FILE", "EnvSpec", "ModelInfo", "Outcome", "Trajectory",
    "TrajectoryFormatError", "TrajectoryWriter", "Turn", "load_trajectories",
    "read_trajectories", "schema", "validate_record", "write_trajectories",
]

# ---------------------------------------------------------------------------------------------
# Records.


@dataclasses.dataclass(frozen=True)
class EnvSpec:
  """Which environment produced a trajectory."""

  id: str
  """Environment id: ``"frozenlake"``, ``"sokoban"``, or a deployment's own name."""

  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  """The environment's settings as JSON data. For our games these are the full keyword
  overrides of `oel_jax.envs.make_env`, so ``make_env(id, seed=seed, **settings)`` rebuilds
  the environment."""

  def __post_init__(self):
    object.__setattr__(self, "settings", json_data(self.settings, "env.settings"))


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """The model that produced the responses."""

  name: str
  """Hugging Face id or local path of the deployed model (or a deployment's own name)."""

  round: int | None = None
  """OEL round that deployed this model (0 = the initial model); None when not applicable."""


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a game ended, as the environment judged it."""

  success: bool
  """Whether the task was passed (our games: the environment's reward equals 1)."""

  reward: float
  """The environment's raw reward. TextArena gives partial credit in [0, 1) on failure;
  a game stopped by the turn limit gets 0. Pass rates use `success`, not this."""

  reason: str
  """The environment's explanation of the ending (TextArena's ``reason``)."""

  def __post_init__(self):
    if type(self.reward) is int:  # Keep 1 and 1.0 the same record on disk.
      object.__setattr__(self, "reward", float(self.reward))


@dataclasses.dataclass(frozen=True)
class Turn:
  """One model call in a trajectory."""

  observation: str
  """What the environment said this turn, alone (the extractor's ``Round{i}_Input``). For our
  games: the messages since the previous action, as the official code records them."""

  prompt: str
  """The exact user-message text given to the model this turn (before any chat template)."""

  response: str
  """The model's raw output, reasoning included when it was kept."""

  action: str | None = None
  """The action sent to the environment, parsed from `response` (``"[up]"``, or
  ``"[no valid action]"`` when the response held none); None when not applicable."""

  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  """Free-form JSON data about this turn (e.g. token counts, finish reason)."""

  content: str | None = None
  """The turn's knowledge-free content, which `prompt_format` renders into the prompt (our
  games: the observation history); None in records that predate it."""

  prompt_format: str | None = None
  """Id of the `oel_jax.prompts.formats.PromptFormat` that rendered the prompt from
  `content` (our games: ``"oel_game"``), so the server side re-renders the turn with
  knowledge; None when the turn records no content (the prompt is then parsed as our game
  prompt)."""

  def __post_init__(self):
    object.__setattr__(self, "metadata", json_data(self.metadata, "turn.metadata"))

  def to_dict(self) -> dict[str, Any]:
    """The turn as JSON data (the optional content fields only when set)."""
    out = {"observation": self.observation, "prompt": self.prompt, "response": self.response,
           "action": self.action, "metadata": self.metadata}
    if self.content is not None:
      out["content"] = self.content
    if self.prompt_format is not None:
      out["prompt_format"] = self.prompt_format
    return out


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """One episode: the environment, the model, every turn, and how it ended."""

  env: EnvSpec
  """The environment and its settings."""

  model: ModelInfo
  """The model that played."""

  turns: tuple[Turn, ...]
  """The turns in order (a list given here is stored as a tuple)."""

  final_feedback: str
  """The environment's closing text (our games: ``"Summary:\\nFinal Result: ..."`` or the
  turn-limit note); may be empty when a deployment has none."""

  outcome: Outcome | None = None
  """How the game ended; None where the deployment has no judgement (it is optional)."""

  seed: int | None = None
  """The environment seed (a non-negative integer), or None when there is none."""

  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  """Free-form JSON data about the whole episode (e.g. sampling settings)."""

  def __post_init__(self):
    object.__setattr__(self, "turns", tuple(self.turns))
    object.__setattr__(self, "metadata", json_data(self.metadata, "metadata"))

  def to_dict(self) -> dict[str, Any]:
    """Returns the record as JSON data, validated (raises TrajectoryFormatError if not valid)."""
    record = {
        "version": FORMAT_VERSION,
        "env": {"id": self.env.id, "settings": self.env.settings},
        "seed": self.seed,
        "model": {"name": self.model.name, "round": self.model.round},
        "turns": [t.to_dict() for t in self.turns],
        "final_feedback": self.final_feedback,
        "outcome": (None if self.outcome is None else
                    {"success": self.outcome.success, "reward": self.outcome.reward,
                     "reason": self.outcome.reason}),
        "metadata": self.metadata,
    }
    validate_record(record)
    return json_data(record, "record")

  @classmethod
  def from_dict(cls, record: Any) -> Trajectory:
    """Builds a Trajectory from JSON data; raises TrajectoryFormatError naming the field."""
    validate_record(record)
    outcome = record.get("outcome")
    model = record["model"]
    return cls(
        env=EnvSpec(id=record["env"]["id"], settings=record["env"].get("settings", {})),
        seed=record.get("seed"),
        model=ModelInfo(name=model["name"], round=model.get("round")),
        turns=tuple(Turn(observation=t["observation"], prompt=t["prompt"],
                         response=t["response"], action=t.get("action"),
                         metadata=t.get("metadata", {}), content=t.get("content"),
                         prompt_format=t.get("prompt_format")) for t in record["turns"]),
        final_feedback=record["final_feedback"],
        outcome=(None if outcome is None else
                 Outcome(success=outcome["success"], reward=float(outcome["reward"]),
                         reason=outcome["reason"])),
        metadata=record.get("metadata", {}),
    )

  def to_json(self) -> str:
    """Returns the record as one line of JSON (no newline)."""
    return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

  @classmethod
  def from_json(cls, text: str) -> Trajectory:
    """Parses one JSON record; raises TrajectoryFormatError naming the field."""
    return cls.from_dict(parse_json(text))


# ---------------------------------------------------------------------------------------------
# Files.


def read_trajectories(path: str | os.PathLike[str]) -> Iterator[Trajectory]:
  """Yields the trajectories of a JSONL file in order, one line at a time.

  Blank lines are skipped. The first malformed line raises TrajectoryFormatError naming the
  file, the line number and the field; trajectories before it have already been yielded.
  """
  path_str = os.fspath(path)
  with open(path_str, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise TrajectoryFormatError(f"not UTF-8 ({e.reason} at byte {e.start})",
                                    path=path_str, line=number) from None
      if not text.strip():
        continue
      try:
        yield Trajectory.from_json(text)
      except TrajectoryFormatError as e:
        raise TrajectoryFormatError(e.problem, field=e.field, path=path_str,
                                    line=number) from None


def load_trajectories(path: str | os.PathLike[str]) -> list[Trajectory]:
  """Reads a whole JSONL file into a list (see `read_trajectories`)."""
  return list(read_trajectories(path))


class TrajectoryWriter:
  """Writes a JSONL trajectory file atomically, one record at a time.

  Use as a context manager. Records go to a temporary file next to ``path``
  (`oel_jax.atomic_write.AtomicFile`); leaving the ``with`` block normally renames it to
  ``path`` (replacing any old file, whose permission bits it takes; a new file gets those of
  a plain ``open``) after an fsync; leaving it by an exception, or calling `abort`, deletes
  it and leaves ``path`` untouched; so does dropping a writer that was never committed.
  A record that is not valid raises TrajectoryFormatError from `write` (and, inside ``with``,
  aborts the file).

      with TrajectoryWriter("runs/round1.jsonl") as w:
        for t in trajectories:
          w.write(t)
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    self.count = 0
    """Number of records written so far."""
    # An AtomicFile dropped unfinished deletes its temporary file, so this class needs no
    # __del__ of its own.
    self._out = AtomicFile(self.path, "wb")

  def write(self, trajectory: Trajectory) -> None:
    """Validates and appends one record."""
    if self._out.file is None:
      raise ValueError(f"writer for {self.path} is closed")
    if not isinstance(trajectory, Trajectory):
      raise TypeError(f"expected a Trajectory, got {type(trajectory).__name__}")
    self._out.file.write(trajectory.to_json().encode("utf-8") + b"\n")
    self.count += 1

  def commit(self) -> None:
    """Flushes, syncs and renames the temporary file to the destination."""
    if self._out.file is None:
      raise ValueError(f"writer for {self.path} is closed")
    self._out.commit()

  def abort(self) -> None:
    """Discards everything written; the destination is left as it was."""
    self._out.abort()

  def __enter__(self) -> TrajectoryWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.abort()


@distributed.writer_only
def write_trajectories(path: str | os.PathLike[str], trajectories: Iterable[Trajectory]) -> int:
  """Writes ``trajectories`` to a JSONL file atomically; returns how many were written.

  Nothing is left half-written: if a record is invalid or the iterable raises, the file at
  ``path`` is left as it was (absent, or its old contents) and the error propagates. On
  several processes, process 0 writes and the others wait (and get None):
  `oel_jax.distributed.writer_only`.
  """
  with TrajectoryWriter(path) as w:
    for t in trajectories:
      w.write(t)
  return w.count
