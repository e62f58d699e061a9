"""OpenAI-format chat logs -> trajectory records.

A chat log is JSON Lines, one conversation per line, the shape gateways and vLLM's request
logging export:

    {"messages": [{"role": "system"|"developer"|"user"|"assistant"|"tool"|"function",
                   "content": str | [{"type": "text", "text": str}, ...] | null, ...}, ...],
     "feedback"?: str, "reward"?: number, "success"?: bool, "model"?: str, "id"?: str}

Each line becomes one `oel_jax.envs.Trajectory` with one `Turn` per assistant message:

- ``content``: `oel_jax.prompts.formats.chat_content` of the messages before it (system,
  user and assistant messages as text), ``prompt_format`` ``"chat"``, so consolidation renders
  the student's and the teacher's prompt from it (`oel_jax.prompts.formats.CHAT`);
- ``prompt``: the last user message's text before it; ``observation``: the text of the user
  messages since the previous assistant message, joined by a blank line; ``response``: the
  assistant message's text; ``action`` null.
- ``final_feedback``: the line's ``feedback`` (or ""); ``outcome``: `records.outcome_of`
  (success defaults to reward > 0, reward to 1.0 / 0.0; neither -> null), the serve log's rule.
- ``env``: ``{"id": env_id, "settings": {}}``; ``model``: the line's ``model``, else the
  ``model_name`` given, round null; ``seed`` null; ``metadata``: ``{"source": file, "line":
  n}`` and the line's ``id`` when it has one.

Content given as a list of parts keeps its ``"text"`` parts, joined by newlines (as vLLM's
chat templates join them); other parts (images, audio) are dropped and counted. "developer"
is OpenAI's newer name for "system" and is read as one. Tool use is not a turn of ours: tool
and function messages, and assistant messages that only call tools (no text), are dropped and
counted. An assistant message with no user message since the previous assistant reply (or
since the start), or right after a system message, has no prompt to learn from: it stays in
the conversation's history but is no turn, and is counted. A line with no turn left is skipped, and counted.

Anything malformed (not JSON, ``messages`` missing or not a list, an unknown role, content of
the wrong type, a ``reward`` that is not a number, ...) raises `LogError` naming the file, the
line and the field; with ``skip_invalid`` the line is skipped instead and counted, with its
error kept in the summary. Other top-level keys of a line are ignored, and counted by name.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from oel_jax.envs import EnvSpec, ModelInfo, Trajectory, Turn
from oel_jax.prompts import formats
from oel_jax.trajectories.records import LogError, json_line, kind, optional, outcome_of

KNOWN_KEYS = ("messages", "feedback", "reward", "success", "model", "id")
"""The top-level keys of a chat-log line that the importer reads."""

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
"""The roles a message may have."""


@dataclasses.dataclass
class ImportSummary:
  """What an import read, made and left out (counts by reason)."""

  files: list[str] = dataclasses.field(default_factory=list)
  """The files read, in order."""

  lines: int = 0
  """Non-blank lines read."""

  trajectories: int = 0
  """Trajectories made (one per imported line)."""

  turns: int = 0
  """Turns made (one per assistant message kept)."""

  skipped_lines: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  """Lines that made no trajectory, by reason."""

  dropped_messages: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  """Messages (or content parts) left out of the trajectories, by reason."""

  ignored_keys: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  """Top-level keys the importer does not read, by name: lines that had each."""

  errors: list[str] = dataclasses.field(default_factory=list)
  """With ``skip_invalid``: the first errors of the skipped malformed lines (up to 20)."""

  def describe(self) -> str:
    """The summary as lines of text (what the command prints)."""
    out = [f"read {self.lines} lines from {len(self.files)} file(s): "
           f"{self.trajectories} trajectories, {self.turns} turns"]
    for title, counts in (("skipped lines", self.skipped_lines),
                          ("dropped messages", self.dropped_messages),
                          ("ignored keys (lines)", self.ignored_keys)):
      if counts:
        out.append(f"{title}: " + ", ".join(f"{reason}: {n}" for reason, n in
                                            sorted(counts.items())))
    out.extend(f"  {e}" for e in self.errors)
    return "\n".join(out)

  def to_dict(self) -> dict[str, Any]:
    """The summary as JSON data."""
    return {"files": list(self.files), "lines": self.lines,
            "trajectories": self.trajectories, "turns": self.turns,
            "skipped_lines": dict(self.skipped_lines),
            "dropped_messages": dict(self.dropped_messages),
            "ignored_keys": dict(self.ignored_keys), "errors": list(self.errors)}


def _text(content: Any, field: str, dropped: collections.Counter) -> str | None:
  """A message's text: a string, or the text parts of a list of parts (None for null)."""
  if content is None or isinstance(content, str):
    return content
  if not isinstance(content, list):
    raise LogError(f"expected a string, a list of parts or null, got {kind(content)}",
                   field=field)
  texts = []
  for i, part in enumerate(content):
    where = f"{field}[{i}]"
    if not isinstance(part, dict):
      raise LogError(f"expected a content part object, got {kind(part)}", field=where)
    ptype = part.get("type")
    if not isinstance(ptype, str):
      raise LogError(f"expected a string, got {kind(ptype)}", field=f"{where}.type")
    if ptype != "text":
      dropped[f"{ptype} content part"] += 1
      continue
    text = part.get("text")
    if not isinstance(text, str):
      raise LogError(f"expected a string, got {kind(text)}", field=f"{where}.text")
    texts.append(text)
  return "\n".join(texts)


def _messages(record: dict, dropped: collections.Counter) -> list[dict[str, str]]:
  """The line's system/user/assistant messages as text (tool use dropped, counted)."""
  messages = record.get("messages")
  if "messages" not in record:
    raise LogError("required field is missing", field="messages")
  if not isinstance(messages, list):
    raise LogError(f"expected an array of messages, got {kind(messages)}", field="messages")
  out = []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict):
      raise LogError(f"expected a message object, got {kind(m)}", field=where)
    role = m.get("role")
    if role not in ROLES:
      raise LogError(f"expected one of {ROLES}, got {role!r}", field=f"{where}.role")
    if "content" not in m and role != "assistant":
      raise LogError("required field is missing", field=f"{where}.content")
    text = _text(m.get("content"), f"{where}.content", dropped)
    if role in ("tool", "function"):
      dropped[f"{role} message"] += 1
      continue
    if text is None and role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
      dropped["assistant tool call"] += 1
      continue
    if text is None:
      raise LogError("expected a string or a list of parts, got null", field=f"{where}.content")
    out.append({"role": "system" if role == "developer" else role, "content": text})
  return out


def conversation_turns(messages: Sequence[dict[str, str]], dropped: collections.Counter
                       ) -> list[Turn]:
  """One `Turn` per assistant message that follows a user message (see the module
  docstring); ``messages`` are system/user/assistant messages with text contents."""
  turns = []
  since: list[str] = []  # User texts since the previous assistant message.
  for i, m in enumerate(messages):
    if m["role"] == "user":
      since.append(m["content"])
    elif m["role"] == "assistant":
      if not since:
        dropped["assistant message without a user message before it"] += 1
      elif messages[i - 1]["role"] != "user":
        # A system message between the user's and the reply: the prompt would not end with
        # the user's message, as a chat turn's content must.
        dropped["assistant message right after a system message"] += 1
      else:
        before = list(messages[:i])
        turns.append(Turn(observation="\n\n".join(since), prompt=formats.user_text(before),
                          response=m["content"], content=formats.chat_content(before),
                          prompt_format=formats.CHAT.id))
      since = []
  return turns


def line_trajectory(record: Any, *, env_id: str, model_name: str, source: str, line: int,
                    summary: ImportSummary) -> Trajectory | None:
  """One chat-log line's trajectory, or None when it has no turn (counted in ``summary``).

  Raises:
    LogError: the line is malformed (unlocated; `import_chat_logs` adds file and line).
  """
  if not isinstance(record, dict):
    raise LogError(f"expected a JSON object, got {kind(record)}")
  dropped: collections.Counter = collections.Counter()
  messages = _messages(record, dropped)
  feedback = optional(record, "feedback", (str,), "a string")
  reward = optional(record, "reward", (int, float), "a number")
  success = optional(record, "success", (bool,), "a boolean")
  model = optional(record, "model", (str,), "a string")
  line_id = optional(record, "id", (str,), "a string")
  turns = conversation_turns(messages, dropped)
  summary.dropped_messages.update(dropped)
  for key in record:
    if key not in KNOWN_KEYS:
      summary.ignored_keys[key] += 1
  if not turns:
    summary.skipped_lines["no assistant reply to a user message"] += 1
    return None
  metadata: dict[str, Any] = {"source": source, "line": line}
  if line_id is not None:
    metadata["id"] = line_id
  return Trajectory(env=EnvSpec(env_id), model=ModelInfo(model or model_name, None),
                    turns=tuple(turns), final_feedback=feedback or "",
                    outcome=outcome_of(success, reward, feedback), seed=None,
                    metadata=metadata)


def import_chat_logs(paths: Iterable[str | os.PathLike[str]], *, env_id: str = "chat",
                     model_name: str = "", skip_invalid: bool = False
                     ) -> tuple[list[Trajectory], ImportSummary]:
  """Reads chat logs into trajectories, in file and line order.

  Args:
    paths: the JSONL files.
    env_id: the ``env.id`` the trajectories record.
    model_name: the model name for lines that name none.
    skip_invalid: skip malformed lines (counted, first errors kept) instead of raising.

  Returns:
    The trajectories and the summary of what was imported and left out.

  Raises:
    LogError: a malformed line (file:line: field: problem), unless ``skip_invalid``.
  """
  summary = ImportSummary()
  out = []
  for path in paths:
    path = os.fspath(path)
    summary.files.append(path)
    with open(path, "rb") as f:
      for number, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        summary.lines += 1
        try:
          trajectory = line_trajectory(json_line(raw), env_id=env_id, model_name=model_name,
                                       source=path, line=number, summary=summary)
        except LogError as e:
          located = e.at(path, number)
          if not skip_invalid:
            raise located from None
          field = re.sub(r"\[\d+\]", "[]", e.field) if e.field else "the line"
          summary.skipped_lines[f"malformed: {field}"] += 1
          if len(summary.errors) < 20:
            summary.errors.append(str(located))
          continue
        if trajectory is not None:
          out.append(trajectory)
          summary.trajectories += 1
          summary.turns += len(trajectory.turns)
  return out, summary
