"""What a rollout engine offers, and how callers split their requests to it.

A rollout engine samples continuations of token-id prompts: `oel_jax.sampling.Sampler`, or
anything with the `TokenSampler` protocol. Rollouts, evaluation and consolidation give it
their prompts in chunks (`in_chunks`) of at most a configured size, so one call's batch fits
in memory; which seed each chunk or prompt samples with is the caller's rule.

This module imports nothing heavy, so the user side (`oel_jax.envs`) can name the protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class TokenSampler(Protocol):
  """An object that samples replies to token-id prompts (`oel_jax.sampling.Sampler` is one).

  ``generate`` returns an object with ``tokens`` (generated ids per prompt, the stop token
  included when hit) and ``finish_reasons`` (``"stop"`` or ``"length"``). An optional
  ``max_seq_len`` attribute lets callers report over-long prompts themselves; consolidation
  also calls ``update_weights`` (a model or its state: the weights to sample with next). An
  optional ``shares_prefixes`` attribute, when True, says that ``generate`` also takes
  ``share_prefix=True``: prefill the prefix common to all prompts once, the replies unchanged
  (callers whose prompts all hold one knowledge text ask for it). An optional
  ``supports_slots`` attribute, when True, says that `oel_jax.slots.SlotDecoder` can drive it
  (continuous batching: `oel_jax.sampling.Sampler`, on one device or a mesh).
  """

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               temperature: float, top_k: int, top_p: float,
               seed: int | Sequence[int]) -> Any:
    """Samples one reply per prompt (see the class docstring)."""
    ...


def in_chunks(items: Sequence[Item], size: int | None,
              call: Callable[[list[Item], int], Sequence[Result]]) -> list[Result]:
  """``call(chunk, index)`` on consecutive chunks of at most ``size`` items, results joined.

  Args:
    items: the requests, in order.
    size: most items per call; None: all in one call.
    call: answers one chunk (its items and its 0-based index) with one result per item.

  Returns:
    The results of every chunk, in the order of ``items``.

  Raises:
    ValueError: a call returned another number of results than it was given items.
  """
  size = size or max(len(items), 1)
  out: list[Result] = []
  for index, lo in enumerate(range(0, len(items), size)):
    chunk = list(items[lo:lo + size])
    results = list(call(chunk, index))
    if len(results) != len(chunk):
      raise ValueError(f"the sampler returned {len(results)} replies for {len(chunk)} prompts")
    out.extend(results)
  return out


def replies(output: Any) -> list[tuple[list[int], str]]:
  """``(tokens, finish_reason)`` per prompt of a `TokenSampler.generate` result.

  Raises:
    ValueError: the result holds unequal numbers of token lists and finish reasons.
  """
  tokens, reasons = list(output.tokens), list(output.finish_reasons)
  if len(tokens) != len(reasons):
    raise ValueError(f"the sampler returned {len(tokens)} replies and {len(reasons)} finish "
                     "reasons")
  return [([int(t) for t in toks], str(reason)) for toks, reason in zip(tokens, reasons)]
