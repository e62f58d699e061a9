"""What the importers share: the located error, the outcome rule, strict JSON lines, timestamps.

`LogError` names the file, the line and the field of a malformed log line, worded as
`oel_jax.envs.TrajectoryFormatError` words a bad trajectory record
(``chats.jsonl:12: messages[3].content: expected a string or a list of parts, got an
integer``). `outcome_of` is the serve log contract's reading rule for feedback
(``/work/s13/serve_log_spec.md``, "Reading"), which the chat-log importer applies too.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from oel_jax.envs import Outcome
from oel_jax.envs.trajectory_format import parse_json
from oel_jax.errors import InputError


class LogError(InputError):
  """A malformed line of a chat log or a serve log.

  Attributes:
    path: the file.
    line: the 1-based line number.
    field: the offending field as a path (``messages[2].content``), or None for the line.
    problem: what is wrong with it.
  """

  def __init__(self, problem: str, *, field: str | None = None, path: str | None = None,
               line: int | None = None):
    self.path, self.line, self.field, self.problem = path, line, field, problem
    where = f"{path}:{line}: " if path is not None else ""
    what = f"{field}: " if field else ""
    super().__init__(f"{where}{what}{problem}")

  def at(self, path: str, line: int) -> LogError:
    """The same problem, located in ``path`` at ``line``."""
    return LogError(self.problem, field=self.field, path=path, line=line)


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "an array", dict: "an object", type(None): "null"}


def kind(value: Any) -> str:
  """The JSON type of ``value`` with its article ("an integer"), for messages."""
  return _NAMES.get(type(value), type(value).__name__)


def json_line(raw: bytes) -> Any:
  """One decoded JSON line (strict: no NaN, no duplicate keys).

  Raises:
    LogError: not UTF-8 or not JSON (unlocated: the caller adds file and line).
  """
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise LogError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
  try:
    return parse_json(text)
  except InputError as e:
    raise LogError(str(e)) from None


def optional(record: dict, key: str, types: tuple[type, ...], expected: str) -> Any:
  """``record[key]`` when present and not null, checked against ``types`` (bool is never a
  number here); None when absent or null.

  Raises:
    LogError: the value has another type (the field is ``key``).
  """
  value = record.get(key)
  if value is None:
    return None
  if isinstance(value, bool) and bool not in types or not isinstance(value, types):
    raise LogError(f"expected {expected} or null, got {kind(value)}", field=key)
  if isinstance(value, float) and not math.isfinite(value):
    raise LogError(f"{value!r} is not a finite number", field=key)
  return value


def outcome_of(success: bool | None, reward: float | None, feedback: str | None
               ) -> Outcome | None:
  """The contract's rule: ``Outcome(success, reward, reason=feedback or "")`` where success
  defaults to ``reward > 0`` and reward to ``1.0 if success else 0.0``; None when neither
  success nor reward is given."""
  if success is None and reward is None:
    return None
  if success is None:
    success = reward > 0
  if reward is None:
    reward = 1.0 if success else 0.0
  return Outcome(success=bool(success), reward=float(reward), reason=feedback or "")


def parse_time(text: str) -> float:
  """Unix seconds from ``text``: a number of seconds, or an ISO 8601 time (UTC when it names
  no zone; ``Z`` accepted).

  Raises:
    ValueError: neither.
  """
  text = text.strip()
  try:
    value = float(text)
  except ValueError:
    pass
  else:
    if not math.isfinite(value):
      raise ValueError(f"{text!r} is not a finite time")
    return value
  try:
    when = datetime.datetime.fromisoformat(text)
  except ValueError:
    raise ValueError(f"{text!r} is neither unix seconds nor an ISO 8601 time "
                     "(e.g. 2026-12-01T09:30:00Z)") from None
  if when.tzinfo is None:
    when = when.replace(tzinfo=datetime.timezone.utc)
  return when.timestamp()
