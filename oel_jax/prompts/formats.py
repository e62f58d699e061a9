"""Prompt formats: how one turn's knowledge-free content and a knowledge text become messages.

A trajectory turn records its knowledge-free ``content`` and the id of the `PromptFormat` that
rendered it (`oel_jax.envs.Turn`); rollouts render the prompts they play through a format,
and consolidation renders the student's prompt (no knowledge) and the teacher's (with a
knowledge text) through the same format, so the server side never edits prompt text:

    fmt = FORMATS[turn.prompt_format]
    student = fmt.messages(turn.content)              # what the model saw
    teacher = fmt.messages(turn.content, knowledge)   # the same turn with the knowledge

Formats shipped here:

- `GAME` (``"oel_game"``): the paper's game prompt (Fig. 12; DESIGN.md section 5.1), one user
  message: the header line, the knowledge block when knowledge is given, ``Current
  situation:`` with the content (the observation history), the closing question.
- `SYSTEM_KNOWLEDGE` (``"system_knowledge"``): the content as the user message, as it is;
  the knowledge, when given, as a system message before it. For deployments whose prompts are
  not our game template.
- `CHAT` (``"chat"``): a recorded conversation: the content is the JSON list of its messages
  before the response (``[{"role": "system"|"user"|"assistant", "content": str}, ...]``,
  ending with a user message); the knowledge, when given, goes first in the system message (a
  system message of its own when the conversation has none). For served and imported chat
  logs (`oel_jax.serve`, `oel_jax.trajectories`).
- `RECORDED_GAME` (not in `FORMATS`, never recorded): the fallback for turns written before
  turns carried their content (no ``prompt_format``): the content is the recorded game prompt
  itself, and the knowledge block is put into it by `insert_knowledge`.

Another format is an object with an ``id`` and a ``messages`` method, added to `FORMATS`
under its id before trajectories naming it are consolidated.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Protocol, runtime_checkable

from oel_jax import prompts

Message = dict[str, str]
"""One chat message: ``{"role": ..., "content": ...}``."""


@runtime_checkable
class PromptFormat(Protocol):
  """Renders a turn's knowledge-free content, with or without knowledge, as chat messages."""

  id: str
  """The name recorded in trajectory turns (``Turn.prompt_format``)."""

  def messages(self, content: str, knowledge: str | None = None) -> list[Message]:
    """The turn's messages; ``knowledge`` None or "" gives the knowledge-free prompt."""
    ...


def game_prompt(situation: str, knowledge: str | None = None) -> str:
  """The paper's per-turn user message around the observation history ``situation``.

  ``knowledge`` adds the knowledge block of Fig. 12; None or "" leaves it out (an empty
  knowledge is no knowledge, as in the official code).
  """
  if knowledge:
    return prompts.load("game_prompt_with_knowledge").format(experience=knowledge,
                                                              prompt=situation)
  return prompts.load("game_prompt").format(prompt=situation)


def user_text(messages: list[Message]) -> str:
  """The last user message's text (what a trajectory turn records as ``prompt``)."""
  for m in reversed(messages):
    if m["role"] == "user":
      return m["content"]
  raise ValueError("the messages hold no user message")


@dataclasses.dataclass(frozen=True)
class GameFormat:
  """The paper's game prompt: one user message built by `game_prompt`."""

  id: str = "oel_game"
  """The recorded name."""

  def messages(self, content: str, knowledge: str | None = None) -> list[Message]:
    """One user message: ``content`` is the observation history."""
    return [{"role": "user", "content": game_prompt(content, knowledge)}]


@dataclasses.dataclass(frozen=True)
class SystemKnowledgeFormat:
  """The content as the user message; the knowledge, if any, as a system message first."""

  id: str = "system_knowledge"
  """The recorded name."""

  def messages(self, content: str, knowledge: str | None = None) -> list[Message]:
    """``[system: knowledge,] user: content``."""
    user = {"role": "user", "content": content}
    return [{"role": "system", "content": knowledge}, user] if knowledge else [user]


CHAT_ROLES = ("system", "user", "assistant")
"""The roles a recorded conversation's messages may have."""


def chat_content(messages: list[Message]) -> str:
  """The content a `CHAT` turn records for ``messages`` (validated; see `parse_chat_content`)."""
  return json.dumps(_checked_messages(messages, "messages"), ensure_ascii=False)


def parse_chat_content(content: str) -> list[Message]:
  """The messages a `CHAT` turn's content holds.

  Raises:
    ValueError: the content is not JSON, or not a list of ``{"role", "content"}`` objects with
      known roles and string contents ending with a user message; the message names the index
      and the field.
  """
  try:
    messages = json.loads(content)
  except json.JSONDecodeError as e:
    raise ValueError(f"chat content is not JSON: {e}") from None
  return _checked_messages(messages, "chat content")


def _checked_messages(messages, where: str) -> list[Message]:
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: expected a non-empty list of messages, got {messages!r:.80}")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ValueError(f"{where}[{i}]: expected an object, got {type(m).__name__}")
    extra = set(m) - {"role", "content"}
    if extra:
      raise ValueError(f"{where}[{i}]: unexpected fields {sorted(extra)} "
                       "(a message has only role and content)")
    role, text = m.get("role"), m.get("content")
    if role not in CHAT_ROLES:
      raise ValueError(f"{where}[{i}].role: expected one of {CHAT_ROLES}, got {role!r}")
    if not isinstance(text, str):
      raise ValueError(f"{where}[{i}].content: expected a string, got {type(text).__name__}")
    out.append({"role": role, "content": text})
  if out[-1]["role"] != "user":
    raise ValueError(f"{where}[{len(out) - 1}].role: the last message must be the user's, "
                     f"got {out[-1]['role']!r}")
  return out


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """A recorded conversation: the content is its messages as JSON (`chat_content`)."""

  id: str = "chat"
  """The recorded name."""

  def messages(self, content: str, knowledge: str | None = None) -> list[Message]:
    """The conversation; the knowledge, if any, first in its system message."""
    messages = parse_chat_content(content)
    if not knowledge:
      return messages
    if messages[0]["role"] == "system":
      merged = {"role": "system", "content": f"{knowledge}\n\n{messages[0]['content']}"}
      return [merged] + messages[1:]
    return [{"role": "system", "content": knowledge}] + messages


@dataclasses.dataclass(frozen=True)
class RecordedGameFormat:
  """A whole recorded game prompt as the content; knowledge put in by `insert_knowledge`."""

  id: str = "oel_game_recorded"
  """A name for messages; no turn records it (such turns have no ``prompt_format``)."""

  def messages(self, content: str, knowledge: str | None = None) -> list[Message]:
    """One user message: ``content`` with the knowledge block (raises for a foreign prompt)."""
    return [{"role": "user", "content": insert_knowledge(content, knowledge)}]


def insert_knowledge(prompt: str, knowledge: str | None) -> str:
  """Returns the prompt a knowledge-free game ``prompt`` would have been with ``knowledge``.

  ``insert_knowledge(game_prompt(s), k) == game_prompt(s, k)``: how the teacher's input is
  made from a turn recorded without its content (`RECORDED_GAME`).

  Raises:
    ValueError: ``prompt`` does not start with the knowledge-free header.
  """
  plain = prompts.load("game_prompt")
  start = plain[:plain.index("{prompt}")]
  if not prompt.startswith(start):
    raise ValueError("prompt does not start with the knowledge-free game header "
                     f"{start!r}; was it built with knowledge already?")
  if not knowledge:
    return prompt
  template = prompts.load("game_prompt_with_knowledge")
  head = template[:template.index("{prompt}")].format(experience=knowledge)
  return head + prompt[len(start):]


GAME = GameFormat()
"""The format our games play with."""

SYSTEM_KNOWLEDGE = SystemKnowledgeFormat()
"""Knowledge in a system message."""

CHAT = ChatFormat()
"""Recorded conversations (served or imported chat logs)."""

RECORDED_GAME = RecordedGameFormat()
"""The fallback for turns recorded without content (today's parsing of the game prompt)."""

FORMATS: dict[str, PromptFormat] = {GAME.id: GAME, SYSTEM_KNOWLEDGE.id: SYSTEM_KNOWLEDGE,
                                    CHAT.id: CHAT}
"""The formats a trajectory turn may name, by id."""


def get_format(format_id: str) -> PromptFormat:
  """The format named ``format_id``.

  Raises:
    ValueError: no format of that id is in `FORMATS`.
  """
  if format_id not in FORMATS:
    raise ValueError(f"unknown prompt format {format_id!r}; known: {', '.join(FORMATS)} "
                     "(add yours to oel_jax.prompts.formats.FORMATS)")
  return FORMATS[format_id]
