"""Reading the serve workdir's log (`oel_jax.serve`) as trajectories.

The log is the contract of ``/work/s13/serve_log_spec.md`` (issue 16):
``<workdir>/served.jsonl`` holds one trajectory record per completed request (one turn;
``metadata``: ``conversation_id``, ``request_id``, ``created``), ``<workdir>/feedback.jsonl``
one line per accepted feedback (``conversation_id``, ``created``, ``success``, ``reward``,
``feedback``). `read_served(workdir, until)` is the contract's reader:

- the requests with ``created <= until`` (all when None), grouped by conversation id into one
  trajectory each, turns in ``created`` order (ties in file order), env and model from the
  conversation's first request, trajectories in the order of each conversation's first
  request; ``metadata``: ``conversation_id``, ``request_ids`` (in turn order), ``created``
  (the first request's) and ``last_created``; each turn's metadata gains ``request_id`` and
  ``created``;
- the latest feedback line of the conversation (``created <= until``; ties: the later line)
  sets ``final_feedback`` (its text, or "") and ``outcome`` (`records.outcome_of`: success
  defaults to reward > 0, reward to 1.0 / 0.0; neither -> null);
- a final line without its newline (a write cut by a crash) is skipped and counted; any other
  malformed line raises `LogError` naming the file, the line and the field.

`load_served` also takes ``after`` (only requests with ``created > after``: what arrived since
an earlier cut-off) and returns the counts with the trajectories (`ServedLog`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from oel_jax.envs import Trajectory, TrajectoryFormatError
from oel_jax.errors import InputError
from oel_jax.trajectories.records import LogError, json_line, kind, optional, outcome_of

SERVED_FILE = "served.jsonl"
"""The request log in a serve workdir."""

FEEDBACK_FILE = "feedback.jsonl"
"""The feedback log in a serve workdir."""


@dataclasses.dataclass(frozen=True)
class ServedLog:
  """The trajectories read from a serve workdir, and what was left out."""

  trajectories: list[Trajectory]
  """One per conversation (see the module docstring)."""

  requests: int
  """Requests read into the trajectories (within the cut-offs)."""

  outside: int
  """Requests outside the cut-offs (``created > until`` or ``<= after``)."""

  feedback: int
  """Conversations given their latest feedback line (within ``until``)."""

  unmatched_feedback: int
  """Feedback lines within ``until`` for no conversation read (its requests are outside)."""

  truncated: dict[str, int]
  """File name -> final lines skipped for lacking their newline (0 or 1 each)."""

  def describe(self) -> str:
    """The counts as one line of text."""
    cut = ", ".join(f"{n} truncated last line in {f}" for f, n in self.truncated.items() if n)
    return (f"{len(self.trajectories)} conversations from {self.requests} requests "
            f"({self.outside} outside the cut-off), {self.feedback} with feedback, "
            f"{self.unmatched_feedback} feedback lines for conversations not read" + (f"; {cut}" if cut else ""))


def _lines(path: str) -> tuple[list[tuple[int, bytes]], int]:
  """The complete non-blank lines of ``path`` with their numbers, and 1 when its last line
  lacks its newline (skipped) else 0; a missing file has none."""
  if not os.path.exists(path):
    return [], 0
  with open(path, "rb") as f:
    data = f.read()
  raw = data.split(b"\n")
  truncated = 1 if raw[-1].strip() else 0
  return [(i + 1, line) for i, line in enumerate(raw[:-1]) if line.strip()], truncated


def _number(record: dict, key: str, where: str) -> float:
  value = record.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise LogError(f"expected a number, got {kind(value)}"
                   if key in record else "required field is missing", field=where)
  return float(value)


def _request(raw: bytes) -> tuple[Trajectory, str, str, float]:
  """One served.jsonl line: its record, conversation id, request id and time."""
  data = json_line(raw)
  try:
    record = Trajectory.from_dict(data)
  except TrajectoryFormatError as e:
    raise LogError(e.problem, field=e.field) from None
  if len(record.turns) != 1:
    raise LogError(f"expected exactly one turn, got {len(record.turns)}", field="turns")
  meta = data.get("metadata")
  if not isinstance(meta, dict):
    raise LogError(f"expected an object, got {kind(meta)}", field="metadata")
  ids = []
  for key in ("conversation_id", "request_id"):
    if not isinstance(meta.get(key), str):
      raise LogError(f"expected a string, got {kind(meta.get(key))}"
                     if key in meta else "required field is missing", field=f"metadata.{key}")
    ids.append(meta[key])
  return record, ids[0], ids[1], _number(meta, "created", "metadata.created")


def _feedback(raw: bytes) -> tuple[str, float, bool | None, float | None, str | None]:
  """One feedback.jsonl line: conversation id, time, success, reward, text."""
  data = json_line(raw)
  if not isinstance(data, dict):
    raise LogError(f"expected a JSON object, got {kind(data)}")
  conversation = data.get("conversation_id")
  if not isinstance(conversation, str):
    raise LogError(f"expected a string, got {kind(conversation)}"
                   if "conversation_id" in data else "required field is missing",
                   field="conversation_id")
  created = _number(data, "created", "created")
  success = optional(data, "success", (bool,), "a boolean")
  reward = optional(data, "reward", (int, float), "a number")
  text = optional(data, "feedback", (str,), "a string")
  return conversation, created, success, reward, text


def load_served(workdir: str | os.PathLike[str], until: float | None = None, *,
                after: float | None = None) -> ServedLog:
  """The serve workdir's conversations with ``after < created <= until`` (see the module
  docstring); None leaves that side open.

  Raises:
    InputError: ``workdir`` is not a directory.
    LogError: a malformed line (other than a final line cut short), by file and line.
  """
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise InputError(f"{workdir}: not a directory (a serve workdir holds {SERVED_FILE})")

  def inside(created: float) -> bool:
    return (until is None or created <= until) and (after is None or created > after)

  served_path = os.path.join(workdir, SERVED_FILE)
  lines, served_cut = _lines(served_path)
  groups: dict[str, list[tuple[float, int, Trajectory, str]]] = {}
  outside = 0
  for number, raw in lines:
    try:
      record, conversation, request_id, created = _request(raw)
    except LogError as e:
      raise e.at(served_path, number) from None
    if not inside(created):
      outside += 1
      continue
    groups.setdefault(conversation, []).append((created, number, record, request_id))

  feedback_path = os.path.join(workdir, FEEDBACK_FILE)
  lines, feedback_cut = _lines(feedback_path)
  latest: dict[str, tuple[float, int, Any]] = {}
  unmatched = 0
  for number, raw in lines:
    try:
      conversation, created, success, reward, text = _feedback(raw)
    except LogError as e:
      raise e.at(feedback_path, number) from None
    if until is not None and created > until:
      continue
    if conversation not in groups:
      unmatched += 1
      continue
    key = (created, number)
    if conversation not in latest or key >= latest[conversation][:2]:
      latest[conversation] = (created, number, (success, reward, text))

  for requests in groups.values():
    requests.sort(key=lambda r: (r[0], r[1]))
  trajectories = []
  for conversation, requests in sorted(groups.items(), key=lambda g: g[1][0][:2]):
    first = requests[0][2]
    turns = [dataclasses.replace(r[2].turns[0], metadata={
        **r[2].turns[0].metadata, "request_id": r[3], "created": r[0]}) for r in requests]
    success, reward, text = latest[conversation][2] if conversation in latest else \
        (None, None, None)
    trajectories.append(Trajectory(
        env=first.env, model=first.model, turns=tuple(turns), final_feedback=text or "",
        outcome=outcome_of(success, reward, text), seed=None,
        metadata={"conversation_id": conversation, "request_ids": [r[3] for r in requests],
                  "created": requests[0][0], "last_created": requests[-1][0]}))
  return ServedLog(trajectories=trajectories, requests=sum(len(g) for g in groups.values()),
                   outside=outside, feedback=len(latest), unmatched_feedback=unmatched,
                   truncated={SERVED_FILE: served_cut, FEEDBACK_FILE: feedback_cut})


def read_served(workdir: str | os.PathLike[str], until: float | None = None
                ) -> list[Trajectory]:
  """The serve workdir's conversations up to ``until`` (unix seconds; None: all) as
  trajectories: the contract's reader (see the module docstring)."""
  return load_served(workdir, until).trajectories
