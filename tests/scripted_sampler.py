"""A scripted stand-in for `oel_jax.sampling.Sampler`, for rollout and evaluation tests.

It has the sampler's ``generate`` interface and works on token ids: each prompt is decoded
back to the chat text, the user message is cut out of it, and a ``policy(user_message, seed)``
chooses the reply text, which is encoded with the same tokenizer (optionally padded to an
exact length with a filler token) and ended with ``<|im_end|>``. Every call is logged, so tests
can count calls and batch sizes and see exactly what was returned.
"""

from __future__ import annotations

import dataclasses
import random

from oel_jax import tiny
from oel_jax.sampling import GenerationOutput

import bfs_solver

USER_START = "<|im_start|>user\n"
FILLER_ID = 0  # Decodes to "!" in the tiny tokenizer.


@dataclasses.dataclass
class Call:
  """One logged ``generate`` call."""

  prompts: list[list[int]]
  user_messages: list[str]
  kwargs: dict
  tokens: list[list[int]]
  finish_reasons: list[str]


class ScriptedSampler:
  """Replies chosen by ``policy(user_message, seed) -> str | (str, length)``.

  A ``(text, length)`` reply is padded with `FILLER_ID` to exactly ``length`` tokens before
  the stop token. Replies longer than ``max_new_tokens`` are cut there (finish "length").
  """

  def __init__(self, tokenizer, policy, max_seq_len=None):
    self.tokenizer = tokenizer
    self.policy = policy
    if max_seq_len is not None:
      self.max_seq_len = max_seq_len
    self.calls: list[Call] = []

  def generate(self, prompts, *, max_new_tokens, temperature, top_k, top_p, seed):
    users, tokens, reasons = [], [], []
    # One seed per prompt (as `rollout` passes them) or one for the call.
    row_seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    for ids, row_seed in zip(prompts, row_seeds):
      text = self.tokenizer.decode(list(ids))
      start = text.rindex(USER_START) + len(USER_START)
      user = text[start:text.index("<|im_end|>", start)]
      users.append(user)
      reply = self.policy(user, row_seed)
      length = None
      if isinstance(reply, tuple):
        reply, length = reply
      toks = self.tokenizer.encode(reply, add_special_tokens=False)
      if length is not None:
        assert len(toks) <= length, (reply, length)
        toks += [FILLER_ID] * (length - len(toks))
      toks.append(tiny.IM_END_ID)
      if len(toks) > max_new_tokens:
        toks, reason = toks[:max_new_tokens], "length"
      else:
        reason = "stop"
      tokens.append(toks)
      reasons.append(reason)
    self.calls.append(Call([list(p) for p in prompts], users,
                           dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed), tokens, reasons))
    return GenerationOutput(tokens, [[0.0] * len(t) for t in tokens], reasons)

  @property
  def batch_sizes(self) -> list[int]:
    return [len(c.prompts) for c in self.calls]


def bfs_policy(game: str):
  """A policy playing ``game``'s shortest solution from the board in the prompt.

  Replies carry reasoning and distractor brackets before the final action
  (`bfs_solver.response_for`); an unsolvable board gets a reply with no action.
  """
  solve = {"frozenlake": bfs_solver.solve_frozenlake, "sokoban": bfs_solver.solve_sokoban}[game]

  def policy(user: str, seed: int) -> str:
    path = solve(user)
    if not path:
      return "<think>\nNo way through.\n</think>\n\nI give up."
    return bfs_solver.response_for(path[0], random.Random(f"{user}|{seed}"))

  return policy
