"""The extraction stage's text handling.

Trajectories as the extractor reads them, its prompt, parsing its replies, and accumulating and
truncating the knowledge.
"""

from __future__ import annotations

from typing import Any

from oel_jax import chat, prompts
from oel_jax.envs.trajectory import Trajectory
from oel_jax.experience.config import FORMATS, ExtractionConfig

ITEM_PREFIX = "- EXPERIENCE ITEM:"
"""What starts an item of structured knowledge."""

NO_PREVIOUS = "No previous experience."
"""What the prompt shows in place of the knowledge when there is none (official text)."""


def format_trajectory(trajectory: Trajectory) -> str:
  """The trajectory as the extractor reads it (the prompt's ``latest_experience``).

  ``\\nRound{i}_Input: <observation>\\n\\nRound{i}_Output: <response>`` per turn (``i`` from 0),
  then ``\\n\\n\\n<final_feedback>\\n`` when the trajectory has a final feedback.
  """
  parts = [f"\nRound{i}_Input: {turn.observation}\n\nRound{i}_Output: {turn.response}"
           for i, turn in enumerate(trajectory.turns)]
  if trajectory.final_feedback:
    parts.append(f"\n\n\n{trajectory.final_feedback}\n")
  return "".join(parts)


def prompt_template(config: ExtractionConfig) -> str:
  """The extraction template for the config's knowledge format and prompt variant."""
  name = f"extraction_{config.knowledge_format}"
  if config.prompt_variant == "official":
    name += "_official"
  return prompts.load(name)


def extraction_prompt(trajectory: Trajectory | str, knowledge: str,
                      config: ExtractionConfig) -> str:
  """The extractor's user message for one trajectory, given the run's knowledge so far.

  Args:
    trajectory: a trajectory, or its text from `format_trajectory`.
    knowledge: the knowledge accumulated so far in this run ("" at the start).
    config: picks the template and whether the knowledge is shown (`with_previous`).
  """
  text = trajectory if isinstance(trajectory, str) else format_trajectory(trajectory)
  previous = knowledge if (config.with_previous and knowledge) else NO_PREVIOUS
  return prompt_template(config).format(latest_experience=text, previous_experience=previous)


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
