"""A reply's text from its tokens, cut at the first ``stop`` string as OpenAI's API does.

The decoder stops rows at the tokenizer's stop tokens only; a ``stop`` string is applied to
the decoded text afterwards: the text ends before the first occurrence of any of them, the
finish reason becomes "stop", and the reply counts the tokens up to the one that completed
the stop string (the tokens the client's text came from).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
  """Where the earliest stop string starts in ``text``, or None."""
  found = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(found) if found else None


def reply_text(tokenizer: Any, tokens: Sequence[int], finish_reason: str,
               stops: Sequence[str]) -> tuple[str, int, str]:
  """``(text, completion tokens, finish reason)`` of generated ``tokens`` (special tokens
  such as the stop token removed from the text; thinking kept)."""
  decode = lambda toks: tokenizer.decode(list(toks), skip_special_tokens=True)
  text = decode(tokens)
  cut = _first_stop(text, stops) if stops else None
  if cut is None:
    return text, len(tokens), finish_reason
  # The fewest tokens whose text holds a stop string (more tokens only add text after it).
  low, high = 1, len(tokens)
  while low < high:
    mid = (low + high) // 2
    if _first_stop(decode(tokens[:mid]), stops) is None:
      low = mid + 1
    else:
      high = mid
  return text[:cut], low, "stop"
