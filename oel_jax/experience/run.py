"""Running the extraction stage.

`extraction_step` advances all K runs by one trajectory in one batched generation call;
`run_extraction` runs them to the end, resumably, and writes the knowledge set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from oel_jax.envs.trajectory import Trajectory
from oel_jax.experience.config import ExtractionConfig
from oel_jax.experience.files import load_state, save_state, write_knowledge_set
from oel_jax.experience.state import (ExtractionState, pool_digest, start_extraction,
                                      step_seed)
from oel_jax.experience.text import (_parse_answer, accumulate, count_tokens, drop_reasoning,
                                     extraction_prompt, split_items, truncate_knowledge)

_log = logging.getLogger(__name__)

STATE_FILE = "extraction_state.json"
"""The state file `run_extraction` keeps in its ``out_dir``."""
SNAPSHOT_DIR = "step_{:04d}"
"""Sub-folder of ``out_dir`` holding the knowledge set as of a step (`snapshot_every`)."""

Conversation = list[dict[str, str]]
ReplyFn = Callable[..., Sequence[Any]]
"""The extractor as a function: ``generate(conversations, *, seed) -> replies``: one reply per
conversation, each a ``str`` (the decoded text, reasoning included) or an object with a ``text``
attribute such as `oel_jax.sampling.ChatCompletion` (``finish_reason`` and ``tokens`` are
recorded when present)."""


def _reply_text(reply: Any, where: str) -> str:
  text = reply if isinstance(reply, str) else getattr(reply, "text", None)
  if not isinstance(text, str):
    raise TypeError(f"{where}: the generator must return str or objects with a str 'text', "
                    f"got {type(reply).__name__}")
  return text


def extraction_step(state: ExtractionState, pool: Sequence[Trajectory], generate: ReplyFn,
                    tokenizer: Any) -> ExtractionState:
  """Runs accumulation step ``state.step`` of all K runs (one batched generation call).

  Args:
    state: where the runs stand (not done).
    pool: the trajectories ``state.orders`` index.
    generate: ``generate(conversations, seed=...) -> replies`` (see `ReplyFn`).
    tokenizer: the extractor's tokenizer (counts knowledge tokens).

  Returns:
    The state after the step (the input state is not changed).
  """
  if state.done:
    raise ValueError(f"extraction is done: all {state.step} steps have run")
  if len(pool) != state.pool_size:
    raise ValueError(f"the pool holds {len(pool)} trajectories; this extraction was planned "
                     f"for {state.pool_size}")
  config, i = state.config, state.step
  fmt, seed = config.knowledge_format, step_seed(config.seed, state.step)
  indices = [order[i] for order in state.orders]
  conversations = [[{"role": "user", "content": extraction_prompt(pool[j], knowledge, config)}]
                   for j, knowledge in zip(indices, state.knowledge)]
  replies = list(generate(conversations, seed=seed))
  if len(replies) != len(conversations):
    raise ValueError(f"the generator returned {len(replies)} replies for "
                     f"{len(conversations)} conversations")
  knowledge, runs = [], []
  for k, (j, reply, before) in enumerate(zip(indices, replies, state.knowledge)):
    text = _reply_text(reply, f"step {i}, run {k}")
    answer, unterminated = drop_reasoning(text)
    new = _parse_answer(answer, fmt)
    items = len(split_items(new, fmt))
    merged = accumulate(before, new)
    kept = truncate_knowledge(merged, config.max_knowledge_tokens, tokenizer, fmt)
    kept_items = len(split_items(kept, fmt))
    if not new:
      _log.warning("extraction step %d, run %d (trajectory %d): no knowledge extracted%s", i, k,
                   j, " (reasoning never ended)" if unterminated else "")
    tokens = getattr(reply, "tokens", None)
    runs.append({
        "trajectory": j,
        "items": items,
        "empty": not new,
        "unterminated_reasoning": unterminated,
        "finish_reason": getattr(reply, "finish_reason", None),
        "response_tokens": None if tokens is None else len(tokens),
        "knowledge_tokens": count_tokens(tokenizer, kept),
        "knowledge_items": kept_items,
        "dropped_items": len(split_items(merged, fmt)) - kept_items,
    })
    knowledge.append(kept)
  record = {"step": i, "seed": seed, "runs": runs}
  return dataclasses.replace(state, step=i + 1, knowledge=tuple(knowledge),
                             history=state.history + (record,))


def sampler_generate(sampler: Any, tokenizer: Any, config: ExtractionConfig) -> ReplyFn:
  """A `ReplyFn` over `oel_jax.sampling.Sampler.generate_chat` with the config's settings."""

  params = config.sampling_params

  def generate(conversations: Sequence[Conversation], *, seed: int) -> list[Any]:
    return sampler.generate_chat(tokenizer, conversations, enable_thinking=params.enable_thinking,
                                 **params.generate_kwargs(), seed=seed)

  return generate


def run_extraction(pool: Sequence[Trajectory], config: ExtractionConfig, *, tokenizer: Any,
                   generate: ReplyFn | None = None, sampler: Any = None,
                   out_dir: str | os.PathLike[str] | None = None,
                   orders: Sequence[Sequence[int]] | None = None,
                   on_step: Callable[[ExtractionState], None] | None = None
                   ) -> ExtractionState:
  """Runs the K accumulation runs to the end; with ``out_dir``, resumably, writing the set.

  Args:
    pool: the trajectories to extract from (`load_pool`).
    config: the stage's settings.
    tokenizer: the extractor's tokenizer (chat template for ``sampler``; token counts).
    generate: the extractor (see `ReplyFn`); or give ``sampler`` instead.
    sampler: an `oel_jax.sampling.Sampler` holding the extractor's weights.
    out_dir: folder for the state (saved after every step) and the knowledge set. A state
      already there is continued; it must have the same config and pool.
    orders: each run's pool indices (default `plan_orders`); ignored when resuming.
    on_step: called with the state after every step (progress, metrics).

  Returns:
    The final state (``state.knowledge`` is the knowledge set).
  """
  if (generate is None) == (sampler is None):
    raise ValueError("run_extraction: give exactly one of generate= and sampler=")
  if generate is None:
    generate = sampler_generate(sampler, tokenizer, config)
  state_path = None if out_dir is None else os.path.join(os.fspath(out_dir), STATE_FILE)
  if state_path is not None and os.path.exists(state_path):
    state = load_state(state_path)
    if state.config != config:
      raise ValueError(f"{state_path} holds an extraction with another config "
                       f"({state.config}); use the same config, or another out_dir")
    digest = pool_digest(pool)
    if state.pool_size != len(pool) or state.pool_digest != digest:
      raise ValueError(f"{state_path} was made from another trajectory pool "
                       f"({state.pool_size} trajectories, digest {state.pool_digest[:12]}; "
                       f"this pool: {len(pool)}, {digest[:12]})")
  else:
    state = start_extraction(pool, config, orders)
    if state_path is not None:
      os.makedirs(os.fspath(out_dir), exist_ok=True)
      save_state(state_path, state)
  while not state.done:
    state = extraction_step(state, pool, generate, tokenizer)
    if out_dir is not None:
      every = config.snapshot_every
      if every and state.step % every == 0:
        write_knowledge_set(os.path.join(os.fspath(out_dir), SNAPSHOT_DIR.format(state.step)),
                            state)
      save_state(state_path, state)
    if on_step is not None:
      on_step(state)
  if out_dir is not None:
    write_knowledge_set(out_dir, state)
  return state
