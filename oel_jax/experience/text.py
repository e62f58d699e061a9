"""The extraction stage's text handling.

Trajectories as the extractor reads them, its prompt, parsing its replies, and accumulating and
truncating the knowledge.

Our games' trajectories (env id in `oel_jax.envs.GAMES`) are read with the paper's text:
`format_game` (``Round{i}_Input`` / ``Round{i}_Output``) and the paper's templates. Any other
trajectory (a recorded conversation: served requests, imported chat logs) is read as a
conversation: `format_conversation` (``User:`` / ``Assistant:`` turns, then the result and the
feedback) and our generic templates (``extraction_*_conversation.txt``, not the paper's).
"""

from __future__ import annotations

from typing import Any

from oel_jax import chat, prompts
from oel_jax.envs.textarena_games import GAMES
from oel_jax.envs.trajectory import Trajectory
from oel_jax.prompts import formats
from oel_jax.experience.config import FORMATS, ExtractionConfig

ITEM_PREFIX = "- EXPERIENCE ITEM:"
"""What starts an item of structured knowledge."""

NO_PREVIOUS = "No previous experience."
"""What the prompt shows in place of the knowledge when there is none (official text)."""


def is_game(trajectory: Trajectory) -> bool:
  """Whether the trajectory is one of our games (its env id is in `oel_jax.envs.GAMES`)."""
  return trajectory.env.id in GAMES


def format_trajectory(trajectory: Trajectory) -> str:
  """The trajectory as the extractor reads it (the prompt's ``latest_experience``):
  `format_game` for our games, else `format_conversation`."""
  return format_game(trajectory) if is_game(trajectory) else format_conversation(trajectory)


def format_game(trajectory: Trajectory) -> str:
  """A game as the paper's extractor reads it.

  ``\\nRound{i}_Input: <observation>\\n\\nRound{i}_Output: <response>`` per turn (``i`` from 0),
  then ``\\n\\n\\n<final_feedback>\\n`` when the trajectory has a final feedback.
  """
  parts = [f"\nRound{i}_Input: {turn.observation}\n\nRound{i}_Output: {turn.response}"
           for i, turn in enumerate(trajectory.turns)]
  if trajectory.final_feedback:
    parts.append(f"\n\n\n{trajectory.final_feedback}\n")
  return "".join(parts)


def _system_text(trajectory: Trajectory) -> str:
  """The system message the conversation opened with ("" when none, or not a chat turn)."""
  if not trajectory.turns or trajectory.turns[0].prompt_format != formats.CHAT.id:
    return ""
  first = formats.parse_chat_content(trajectory.turns[0].content)[0]
  return first["content"] if first["role"] == "system" else ""


def format_conversation(trajectory: Trajectory) -> str:
  """A recorded conversation as the extractor reads it (ours, not the paper's).

  ``\\nSystem: <text>\\n`` when the conversation opens with a system message (a ``"chat"``
  turn's content), then per turn ``\\nUser: <observation>\\n\\nAssistant: <response>\\n``,
  then, when there is an outcome or a feedback text, ``\\n\\n`` and the lines ``Result:
  success|failure (reward <r>)`` and ``Feedback: <final_feedback>``, each ending in a newline.
  """
  system = _system_text(trajectory)
  parts = [f"\nSystem: {system}\n"] if system else []
  parts += [f"\nUser: {turn.observation}\n\nAssistant: {turn.response}\n"
            for turn in trajectory.turns]
  closing = []
  if trajectory.outcome is not None:
    result = "success" if trajectory.outcome.success else "failure"
    closing.append(f"Result: {result} (reward {trajectory.outcome.reward:g})\n")
  if trajectory.final_feedback:
    closing.append(f"Feedback: {trajectory.final_feedback}\n")
  if closing:
    parts.append("\n\n" + "".join(closing))
  return "".join(parts)


def prompt_template(config: ExtractionConfig, conversation: bool = False) -> str:
  """The extraction template for the config's knowledge format and prompt variant (the
  paper's); ``conversation``: our generic template for recorded conversations (the variant
  does not apply)."""
  name = f"extraction_{config.knowledge_format}"
  if conversation:
    name += "_conversation"
  elif config.prompt_variant == "official":
    name += "_official"
  return prompts.load(name)


def extraction_prompt(trajectory: Trajectory | str, knowledge: str,
                      config: ExtractionConfig, *, conversation: bool | None = None) -> str:
  """The extractor's user message for one trajectory, given the run's knowledge so far.

  Args:
    trajectory: a trajectory, or its text from `format_trajectory`.
    knowledge: the knowledge accumulated so far in this run ("" at the start).
    config: picks the template and whether the knowledge is shown (`with_previous`).
    conversation: use the conversation template; default: for a trajectory, whether it is not
      one of our games (`is_game`); for a text, False (the paper's template).
  """
  if conversation is None:
    conversation = not isinstance(trajectory, str) and not is_game(trajectory)
  text = trajectory if isinstance(trajectory, str) else format_trajectory(trajectory)
  previous = knowledge if (config.with_previous and knowledge) else NO_PREVIOUS
  return prompt_template(config, conversation).format(latest_experience=text,
                                                      previous_experience=previous)


def drop_reasoning(text: str) -> tuple[str, bool]:
  """Removes a thinking model's reasoning from an extractor reply.

  Returns:
    ``(answer, unterminated)``: the text after the last ``</think>`` (the whole text when there
    is no think block); when the text opens ``<think>`` and never closes it (the token budget ran
    out mid-reasoning), the raw text, as the official code keeps it, and True.
  """
  answer = chat.after_reasoning(text)
  if answer is not None:
    return answer, False
  return text, chat.opens_reasoning(text)


def parse_items(answer: str) -> list[str]:
  """The ``- EXPERIENCE ITEM:`` items of a structured answer, in order (see module docstring)."""
  items = []
  for line in answer.split("\n"):
    if ITEM_PREFIX not in line:
      continue
    for part in line.split(ITEM_PREFIX)[1:]:
      if part.strip():
        items.append(ITEM_PREFIX + part.rstrip())
  return items


def parse_extraction(text: str, knowledge_format: str) -> str:
  """The new knowledge in one extractor reply ("" when it holds none).

  Args:
    text: the decoded reply, reasoning included.
    knowledge_format: ``"structured"`` (one item per line) or ``"unstructured"`` (the answer).
  """
  return _parse_answer(drop_reasoning(text)[0], knowledge_format)


def _parse_answer(answer: str, knowledge_format: str) -> str:
  if knowledge_format == "structured":
    return "\n".join(parse_items(answer))
  if knowledge_format == "unstructured":
    return answer.strip()
  raise ValueError(f"knowledge_format must be one of {FORMATS}, got {knowledge_format!r}")


def accumulate(knowledge: str, new: str) -> str:
  """``knowledge + "\\n" + new``, or whichever of the two is not empty."""
  if knowledge and new:
    return f"{knowledge}\n{new}"
  return new or knowledge


def _is_marker_line(line: str) -> bool:
  return line.strip().startswith(ITEM_PREFIX)


def split_items(knowledge: str, knowledge_format: str) -> list[str]:
  """Splits knowledge into the whole items that truncation keeps or drops.

  Structured: an item is a line starting with ``- EXPERIENCE ITEM:`` (leading spaces allowed)
  plus the lines up to the next such line; lines before the first item form one leading
  non-item entry. Unstructured: every line (empty ones too) is an item, as officially.
  ``"\\n".join(split_items(k, f)) == k`` always; "" gives ``[]``.
  """
  if not knowledge:
    return []
  lines = knowledge.split("\n")
  if knowledge_format == "unstructured":
    return lines
  if knowledge_format != "structured":
    raise ValueError(f"knowledge_format must be one of {FORMATS}, got {knowledge_format!r}")
  items: list[str] = []
  for line in lines:
    if _is_marker_line(line) or not items:
      items.append(line)
    else:
      items[-1] += "\n" + line
  return items


def count_tokens(tokenizer: Any, text: str) -> int:
  """Tokens in ``text`` under ``tokenizer`` (no special tokens added)."""
  if not text:
    return 0
  return len(tokenizer.encode(text, add_special_tokens=False))


def truncate_knowledge(knowledge: str, max_tokens: int, tokenizer: Any,
                       knowledge_format: str) -> str:
  """Keeps the newest whole items of ``knowledge`` within ``max_tokens`` tokens.

  Knowledge within the limit is returned unchanged. Otherwise items (`split_items`) are taken
  from the newest back while the sum of their token counts, each counted with a trailing
  newline, stays within ``max_tokens`` (the official rule); older items, and for structured
  knowledge any text before its first item, are dropped. If the kept items still encode to more
  than ``max_tokens`` tokens together (tokenizers can merge across lines), the oldest of them go
  too. When the newest item alone is too long the result is "".
  """
  if count_tokens(tokenizer, knowledge) <= max_tokens:
    return knowledge
  items = split_items(knowledge, knowledge_format)
  if knowledge_format == "structured" and items and not _is_marker_line(items[0]):
    items = items[1:]
  kept: list[str] = []
  total = 0
  for item in reversed(items):
    n = count_tokens(tokenizer, item + "\n")
    if total + n > max_tokens:
      break
    kept.append(item)
    total += n
  kept.reverse()
  text = "\n".join(kept)
  while kept and count_tokens(tokenizer, text) > max_tokens:
    kept.pop(0)
    text = "\n".join(kept)
  return text
