"""The paper's prompt templates, kept verbatim as data files.

Each ``*.txt`` file here starts with a citation header (lines beginning with ``#``) that
ends with the line ``# ---8<--- ...``; everything after that line is the template, byte
for byte: no trailing newline is added or removed. Templates with placeholders are filled
with ``str.format``. See ``README.md`` for the list and where each one comes from
(arXiv:2603.16856, Appendix B), and the two that are ours, not the paper's (the
``*_conversation`` extraction prompts for recorded conversations).
"""

from __future__ import annotations

import functools
import importlib.resources

_CUT = "\n# ---8<---"

NAMES = (
    "task_description",
    "frozenlake_rules",
    "sokoban_rules",
    "game_prompt",
    "game_prompt_with_knowledge",
    "extraction_structured",
    "extraction_unstructured",
    "extraction_structured_official",
    "extraction_unstructured_official",
    "extraction_structured_conversation",
    "extraction_unstructured_conversation",
)
"""The templates shipped in this package, by name (file name without ``.txt``)."""


@functools.cache
def load(name: str) -> str:
  """Returns the template ``name`` (one of `NAMES`), without its citation header.

  Raises:
    KeyError: ``name`` is not a shipped template.
    ValueError: the file lacks its header delimiter (a damaged file).
  """
  if name not in NAMES:
    raise KeyError(f"unknown prompt template {name!r}; known: {', '.join(NAMES)}")
  raw = importlib.resources.files(__package__).joinpath(f"{name}.txt").read_bytes()
  text = raw.decode("utf-8")
  at = text.find(_CUT)
  if not text.startswith("#") or at < 0:
    raise ValueError(f"prompt template {name}.txt has no citation header ending in '# ---8<---'")
  newline = text.find("\n", at + 1)
  return text[newline + 1:]
