"""Trajectory records and files: the boundary between the user side and the server side.

A trajectory file is JSON Lines: one JSON object per line, one trajectory per object, UTF-8.
The format is documented by the JSON Schema shipped next to this module
(``trajectory.schema.json``, see `schema()`); this module validates records by hand, field by
field, and agrees with that schema (``tests/test_trajectory.py`` checks the two against each
other). A record:

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
import functools
import importlib.resources
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from oel_jax.atomic_write import AtomicFile
from oel_jax.errors import InputError

FORMAT_VERSION = 1
"""The record format version this module reads and writes."""

SCHEMA_FILE = "trajectory.schema.json"
"""Name of the JSON Schema file shipped in this package."""


class TrajectoryFormatError(InputError):
  """A trajectory record or file is malformed.

  Attributes:
    path: the file, or None when a record was checked outside a file.
    line: the 1-based line number in ``path``, or None.
    field: the offending field as a path (``turns[2].response``), or None for the whole line.
    problem: what is wrong with it.
  """

  def __init__(self, problem: str, *, field: str | None = None, path: str | None = None,
               line: int | None = None):
    self.path = path
    self.line = line
    self.field = field
    self.problem = problem
    where = f"{path}:{line}: " if path is not None else ""
    what = f"{field}: " if field else ""
    super().__init__(f"{where}{what}{problem}")


# ---------------------------------------------------------------------------------------------
# Records.


def _json_value(value: Any, where: str) -> Any:
  """Returns a deep copy of ``value`` as plain JSON data (tuples become lists).

  Raises TrajectoryFormatError naming ``where`` for anything JSON cannot hold exactly:
  non-string keys, NaN or infinite floats, objects of other types.
  """
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    if not math.isfinite(value):
      raise TrajectoryFormatError(f"{value!r} is not a finite number", field=where)
    return value
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise TrajectoryFormatError(f"key {k!r} is not a string", field=where)
      out[k] = _json_value(v, f"{where}.{k}")
    return out
  if isinstance(value, (list, tuple)):
    return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
  raise TrajectoryFormatError(f"{type(value).__name__} is not a JSON value", field=where)


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
    object.__setattr__(self, "settings", _json_value(self.settings, "env.settings"))


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
    object.__setattr__(self, "metadata", _json_value(self.metadata, "turn.metadata"))

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
    object.__setattr__(self, "metadata", _json_value(self.metadata, "metadata"))

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
    return _json_value(record, "record")

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
    return cls.from_dict(_loads(text))


# ---------------------------------------------------------------------------------------------
# Validation. FIELDS is the validator's field list; trajectory.schema.json says the same.
#
# Types: "string", "integer" (a JSON integer; booleans are not integers), "number" (integer or
# finite float), "boolean", "null", "object" (any JSON object), "array", or the name of a record
# in FIELDS (a nested object checked field by field). "X[]" is an array of X. A field may allow
# several types. "minimum" (integers) and "const" constrain values further; "requires" names a
# field that must be present beside this one.

FIELDS: dict[str, dict[str, dict[str, Any]]] = {
    "Trajectory": {
        "version": {"types": ("integer",), "required": False, "const": FORMAT_VERSION},
        "env": {"types": ("EnvSpec",), "required": True},
        "seed": {"types": ("integer", "null"), "required": False, "minimum": 0},
        "model": {"types": ("ModelInfo",), "required": True},
        "turns": {"types": ("Turn[]",), "required": True},
        "final_feedback": {"types": ("string",), "required": True},
        "outcome": {"types": ("Outcome", "null"), "required": False},
        "metadata": {"types": ("object",), "required": False},
    },
    "EnvSpec": {
        "id": {"types": ("string",), "required": True},
        "settings": {"types": ("object",), "required": False},
    },
    "ModelInfo": {
        "name": {"types": ("string",), "required": True},
        "round": {"types": ("integer", "null"), "required": False, "minimum": 0},
    },
    "Turn": {
        "observation": {"types": ("string",), "required": True},
        "prompt": {"types": ("string",), "required": True},
        "response": {"types": ("string",), "required": True},
        "action": {"types": ("string", "null"), "required": False},
        "metadata": {"types": ("object",), "required": False},
        "content": {"types": ("string",), "required": False},
        "prompt_format": {"types": ("string",), "required": False, "requires": "content"},
    },
    "Outcome": {
        "success": {"types": ("boolean",), "required": True},
        "reward": {"types": ("number",), "required": True},
        "reason": {"types": ("string",), "required": True},
    },
}


def _json_type(value: Any) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  if isinstance(value, int):
    return "integer"
  if isinstance(value, float):
    return "number"
  if isinstance(value, str):
    return "string"
  if isinstance(value, list):
    return "array"
  if isinstance(value, dict):
    return "object"
  return type(value).__name__


_ARTICLE = {"integer": "an integer", "object": "an object", "array": "an array",
            "null": "null", "Trajectory": "a Trajectory object", "Outcome": "an Outcome object",
            "EnvSpec": "an EnvSpec object", "ModelInfo": "a ModelInfo object",
            "Turn": "a Turn object"}


def _describe(type_name: str) -> str:
  if type_name.endswith("[]"):
    return f"an array of {type_name[:-2]} objects"
  return _ARTICLE.get(type_name, f"a {type_name}")


def _matches(value: Any, type_name: str, where: str) -> bool:
  """Whether ``value`` has type ``type_name``; nested records are checked (and may raise)."""
  actual = _json_type(value)
  if type_name.endswith("[]"):
    if actual != "array":
      return False
    for i, item in enumerate(value):
      _check_one(item, type_name[:-2], f"{where}[{i}]")
    return True
  if type_name in FIELDS:
    if actual != "object":
      return False
    _check_record(value, type_name, where)
    return True
  if type_name == "number":
    if actual == "number" and not math.isfinite(value):
      raise TrajectoryFormatError(f"{value!r} is not a finite number", field=where)
    return actual in ("number", "integer")
  return actual == type_name


def _check_one(value: Any, type_name: str, where: str) -> None:
  if not _matches(value, type_name, where):
    raise TrajectoryFormatError(
        f"expected {_describe(type_name)}, got {_describe(_json_type(value))}", field=where)


def _check_record(record: Any, name: str, where: str) -> None:
  """Checks ``record`` against FIELDS[name]; ``where`` is its path ('' for the top level)."""
  fields = FIELDS[name]
  prefix = f"{where}." if where else ""
  if not isinstance(record, dict):
    raise TrajectoryFormatError(
        f"expected {_describe(name)}, got {_describe(_json_type(record))}", field=where or None)
  for key in record:
    if key not in fields:
      raise TrajectoryFormatError(
          f"unknown field (allowed: {', '.join(fields)})", field=f"{prefix}{key}")
  for key, spec in fields.items():
    field = f"{prefix}{key}"
    if key not in record:
      if spec["required"]:
        raise TrajectoryFormatError("required field is missing", field=field)
      continue
    value = record[key]
    types = spec["types"]
    if len(types) == 1:
      _check_one(value, types[0], field)
    elif not any(_matches(value, t, field) for t in types):
      raise TrajectoryFormatError(
          f"expected {' or '.join(_describe(t) for t in types)}, "
          f"got {_describe(_json_type(value))}", field=field)
    if "const" in spec and value != spec["const"]:
      raise TrajectoryFormatError(f"must be {spec['const']!r}, got {value!r}", field=field)
    if "minimum" in spec and isinstance(value, int) and value < spec["minimum"]:
      raise TrajectoryFormatError(f"must be >= {spec['minimum']}, got {value!r}", field=field)
    if "object" in types and isinstance(value, dict):
      _json_value(value, field)  # Rejects NaN / infinity nested in free-form data.
    if "requires" in spec and spec["requires"] not in record:
      raise TrajectoryFormatError(f"needs {prefix}{spec['requires']} beside it", field=field)


def validate_record(record: Any) -> None:
  """Checks one decoded JSON record; raises TrajectoryFormatError naming the first bad field."""
  _check_record(record, "Trajectory", "")


@functools.cache
def schema() -> dict[str, Any]:
  """Returns the JSON Schema of a record (the shipped ``trajectory.schema.json``)."""
  text = importlib.resources.files(__package__).joinpath(SCHEMA_FILE).read_text("utf-8")
  return json.loads(text)


# ---------------------------------------------------------------------------------------------
# Files.


def _reject_constant(name: str) -> Any:
  raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f"duplicate key {k!r}")
    out[k] = v
  return out


def _loads(text: str) -> Any:
  try:
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
  except ValueError as e:  # json.JSONDecodeError is a ValueError.
    raise TrajectoryFormatError(f"invalid JSON: {e}") from None


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


def write_trajectories(path: str | os.PathLike[str], trajectories: Iterable[Trajectory]) -> int:
  """Writes ``trajectories`` to a JSONL file atomically; returns how many were written.

  Nothing is left half-written: if a record is invalid or the iterable raises, the file at
  ``path`` is left as it was (absent, or its old contents) and the error propagates.
  """
  with TrajectoryWriter(path) as w:
    for t in trajectories:
      w.write(t)
  return w.count
