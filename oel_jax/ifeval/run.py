"""IF-Eval answered by our sampler: prompts -> chat template -> generate -> score.

    result = evaluate_ifeval(sampler, tokenizer, path="input_data.jsonl",
                             enable_thinking=False)
    result.scores.prompt_level_strict, json.dumps(result.to_dict())

Each prompt is one user message rendered by the tokenizer's chat template (thinking on or
off) and answered by ``Sampler.generate_chat``. The part scored is the answer after the last
``</think>`` (``oel_jax.chat.split_reasoning``: whitespace around it stripped; a reply whose
reasoning never closed, because the token budget ran out, has an empty answer and so
follows no instruction). Prompts are sorted by token length and answered in chunks of
`batch_size` (so each chunk pads little), and the results are put back in the data's order.
Each prompt samples with its own seed, derived from ``seed`` and the prompt's key
(`prompt_seed`), so an answer does not depend on `batch_size` or on the other prompts.

The defaults are the official OEL protocol (microsoft/LMOps ``oel/README.md``: lm-eval's
``ifeval`` task through vLLM): temperature 0.7, top-p 0.8, top-k 20, seed 42, one sample per
prompt, 1280 new tokens, and thinking off for every model (pass ``enable_thinking=False``).
``temperature=0`` decodes greedily instead. The paper (arXiv:2603.16856 section 4.1) reports
prompt-level strict accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from oel_jax import chat, engine
from oel_jax.ifeval.score import IFEvalExample, IFEvalScores, load_examples, score_example
from oel_jax.ifeval.score import aggregate

_log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 1280  # lm-evaluation-harness's IF-Eval generation budget
OFFICIAL_SEED = 42
"""The sampling seed of the official IF-Eval runs."""


def prompt_seed(seed: int, key: int) -> int:
  """The sampler seed, in [0, 2^64), of the prompt with IF-Eval key ``key`` under ``seed``."""
  return int(np.random.SeedSequence([int(seed), int(key)]).generate_state(1, np.uint64)[0])


@dataclasses.dataclass(frozen=True)
class IFEvalResponse:
  """One prompt's reply and its verdicts."""

  key: int
  """The prompt's ``key``."""
  answer: str
  """The scored text: the reply after ``</think>``."""
  reasoning: str
  """The reply before ``</think>`` (empty with thinking off)."""
  num_tokens: int
  """Tokens generated, the stop token excluded."""
  finish_reason: str
  """"stop" or "length" (the budget ran out)."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class IFEvalResult:
  """An IF-Eval run: the accuracies, how they were produced, and every reply."""

  scores: IFEvalScores
  """Prompt- and instruction-level accuracies, strict and loose, per type, per prompt."""
  enable_thinking: bool
  """Whether the chat template asked for reasoning."""
  max_new_tokens: int
  """The token budget per reply."""
  temperature: float
  """Sampling temperature (0 = greedy)."""
  top_k: int
  """Top-k (0 = off)."""
  top_p: float
  """Top-p (1 = off)."""
  seed: int
  """Base sampling seed (chunk i used seed + i)."""
  batch_size: int
  """Prompts per generate call."""
  num_truncated: int
  """Replies that hit the token budget (finish_reason "length")."""
  num_empty_answers: int
  """Replies whose answer is blank (these follow no instruction)."""
  mean_response_tokens: float
  """Mean generated tokens per reply (reasoning included, stop token excluded)."""
  responses: tuple[IFEvalResponse, ...]
  """Per prompt, in the data's order."""

  @property
  def prompt_level_strict(self) -> float:
    """The paper's IF-Eval number: prompt-level strict accuracy."""
    return self.scores.prompt_level_strict

  def to_dict(self, *, include_responses: bool = True) -> dict[str, Any]:
    """A JSON-ready dict: the settings, the accuracies and (optionally) every reply."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in ("scores", "responses")}
    out.update(self.scores.to_dict(include_prompts=include_responses))
    if include_responses:
      out["responses"] = [r.to_dict() for r in self.responses]
    return out


def _checked_examples(path: str | os.PathLike | None, examples: Sequence[IFEvalExample] | None,
                      limit: int | None, batch_size: int) -> list[IFEvalExample]:
  """The prompts to answer (the first ``limit``); raises before any work on bad arguments."""
  if examples is not None and path is not None:
    raise ValueError("give either path or examples, not both")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if examples is None:
    examples = load_examples(path, limit=limit)
  else:
    examples = list(examples)[:limit] if limit is not None else list(examples)
  if not examples:
    raise ValueError("no IF-Eval prompts to answer")
  return examples


def _response(example: IFEvalExample, reply: Any) -> IFEvalResponse:
  """What is recorded of one prompt's ``generate_chat`` reply."""
  tokens = list(reply.tokens)
  stop = reply.finish_reason == "stop"
  return IFEvalResponse(
      key=example.key, answer=reply.answer, reasoning=reply.reasoning,
      num_tokens=len(tokens) - (1 if stop and tokens else 0),
      finish_reason=reply.finish_reason)


def evaluate_ifeval(sampler: Any, tokenizer: Any, *, path: str | os.PathLike | None = None,
                    examples: Sequence[IFEvalExample] | None = None,
                    enable_thinking: bool, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    limit: int | None = None, batch_size: int = 16,
                    temperature: float = 0.7, top_k: int = 20, top_p: float = 0.8,
                    seed: int = OFFICIAL_SEED) -> IFEvalResult:
  """Answers IF-Eval's prompts with `sampler` and scores the answers.

  Args:
    sampler: an ``oel_jax.sampling.Sampler`` (anything with its ``generate_chat``).
    tokenizer: the model's transformers tokenizer (with its chat template).
    path: IF-Eval's ``input_data.jsonl``; None with `examples` None reads the
      ``google/IFEval`` dataset (needs ``datasets`` and the network or a cache).
    examples: already-loaded prompts, instead of `path`.
    enable_thinking: passed to the chat template (the official protocol: False for every
      model).
    max_new_tokens: the budget per reply (reasoning included).
    limit: answer only the first `limit` prompts.
    batch_size: prompts per ``generate_chat`` call.
    temperature, top_k, top_p: sampling settings (temperature 0 is greedy); the defaults
      are the official protocol's.
    seed: base seed; each prompt samples with `prompt_seed(seed, key)`.

  Returns:
    An `IFEvalResult`.
  """
  examples = _checked_examples(path, examples, limit, batch_size)

  conversations = [[{"role": "user", "content": e.prompt}] for e in examples]
  lengths = [len(chat.encode_chat(tokenizer, c, enable_thinking=enable_thinking))
             for c in conversations]
  order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))

  def answer(rows: list[int], index: int) -> list[Any]:
    out = sampler.generate_chat(
        tokenizer, [conversations[i] for i in rows], enable_thinking=enable_thinking,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=[prompt_seed(seed, examples[i].key) for i in rows])
    _log.info("IF-Eval: answered %d/%d prompts", min((index + 1) * batch_size, len(order)),
              len(order))
    return out

  replies: list[Any] = [None] * len(examples)
  for i, reply in zip(order, engine.in_chunks(order, batch_size, answer)):
    replies[i] = reply

  responses = [_response(e, reply) for e, reply in zip(examples, replies)]
  scores = aggregate([score_example(e, r.answer) for e, r in zip(examples, responses)])
  return IFEvalResult(
      scores=scores, enable_thinking=bool(enable_thinking), max_new_tokens=int(max_new_tokens),
      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=int(seed),
      batch_size=int(batch_size),
      num_truncated=sum(r.finish_reason == "length" for r in responses),
      num_empty_answers=sum(not r.answer.strip() for r in responses),
      mean_response_tokens=sum(r.num_tokens for r in responses) / len(responses),
      responses=tuple(responses))
