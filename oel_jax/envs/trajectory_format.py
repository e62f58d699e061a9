"""What a valid trajectory record is: its field list, the checks, the shipped JSON Schema.

`oel_jax.envs.trajectory` builds its records and reads and writes their files on top of this
module. `validate_record` checks a decoded record field by field against `FIELDS`, which says
the same as ``trajectory.schema.json`` (`schema`); ``tests/test_trajectory.py`` checks the two
against each other. `json_data` and `parse_json` are the strict JSON the format allows: no
NaN or infinity, string keys, no duplicate keys. Every problem is a `TrajectoryFormatError`
naming the field (and, when reading a file, the file and line).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
from collections.abc import Mapping
from typing import Any

from oel_jax.errors import InputError

FORMAT_VERSION = 1
"""The record format version this package reads and writes."""

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
# Strict JSON data.


def json_data(value: Any, where: str) -> Any:
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
      out[k] = json_data(v, f"{where}.{k}")
    return out
  if isinstance(value, (list, tuple)):
    return [json_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
  raise TrajectoryFormatError(f"{type(value).__name__} is not a JSON value", field=where)


def _reject_constant(name: str) -> Any:
  raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f"duplicate key {k!r}")
    out[k] = v
  return out


def parse_json(text: str) -> Any:
  """Decodes one JSON text, refusing NaN, infinities and duplicate keys."""
  try:
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
  except ValueError as e:  # json.JSONDecodeError is a ValueError.
    raise TrajectoryFormatError(f"invalid JSON: {e}") from None


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


_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"),
               (str, "string"), (list, "array"), (dict, "object"))
"""Python types and the JSON type each one is; bool comes before int, which it subclasses."""


def _json_type(value: Any) -> str:
  for python_type, name in _JSON_TYPES:
    if isinstance(value, python_type):
      return name
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
      json_data(value, field)  # Rejects NaN / infinity nested in free-form data.
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
