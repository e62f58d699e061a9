"""The Environment protocol, action parsing, and the per-turn prompt wrapper.

An environment is a multi-turn text game played through whole model responses:

    env = make_env("frozenlake", seed=3)
    prompt = env.reset()                   # the user message for turn 0
    while not env.done:
      prompt, done = env.step(generate(prompt))
    env.outcome(), env.final_feedback, env.trajectory(model=ModelInfo("Qwen/Qwen3-1.7B"))

Each `step` is cheap, pure Python, and touches only its own environment, so a rollout can
drive many environments in lockstep: one batched generation per turn over the prompts of the
environments that are not yet `done`.

Prompt shape (arXiv:2603.16856 Fig. 12 and the official code, DESIGN.md section 5.1): a header
line, then, only when knowledge is given, the knowledge block, then ``Current situation:`` with
the observation history, then the closing question. The templates are data files in
`oel_jax.prompts`.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

from oel_jax.prompts import formats
from oel_jax.envs.trajectory import EnvSpec, ModelInfo, Outcome, Trajectory, Turn

ACTIONS = {
    "[up]": "up", "[down]": "down", "[left]": "left", "[right]": "right",
    "[w]": "up", "[a]": "left", "[s]": "down", "[d]": "right",
}
"""The bracketed actions a response may contain, and the move each one means."""

NO_ACTION = "[no valid action]"
"""What is sent to the game when a response contains no action (the game rejects it as an
invalid move; the official code does the same)."""

# Exact, case-sensitive, no inner spaces: "[Up]" and "[ up ]" are not actions (as officially).
_ACTION_RE = re.compile(r"\[(?:up|down|left|right|w|a|s|d)\]")


def parse_action(response: str) -> str:
  """Returns the action to send for ``response``: the last bracketed action in it, as a move.

  The last occurrence anywhere in the text of any of ``[up] [down] [left] [right] [w] [a] [s]
  [d]`` wins and is sent in word form (``"[w]"`` -> ``"[up]"``); with none, `NO_ACTION`.
  Matching is case-sensitive, as in the official implementation.
  """
  if not isinstance(response, str):
    raise TypeError(f"response must be a string, got {type(response).__name__}")
  last = None
  for last in _ACTION_RE.finditer(response):
    pass
  if last is None:
    return NO_ACTION
  return f"[{ACTIONS[last.group(0)]}]"


def build_prompt(situation: str, knowledge: str | None = None) -> str:
  """Wraps the observation history ``situation`` into the user message of one turn.

  ``knowledge`` (the experiential knowledge text) adds the knowledge block of the paper's
  Fig. 12; None or an empty string leaves it out (an empty knowledge is no knowledge, as in
  the official code). The text of `oel_jax.prompts.formats.GAME`.
  """
  return formats.game_prompt(situation, knowledge)


insert_knowledge = formats.insert_knowledge


@runtime_checkable
class Environment(Protocol):
  """A multi-turn text environment played through model responses (see module docstring)."""

  spec: EnvSpec
  """Environment id and settings, as recorded in trajectories."""

  seed: int | None
  """The seed the episode's board comes from."""

  knowledge: str | None
  """Knowledge text shown in every prompt (the Fig. 12 block), or None."""

  def reset(self) -> str:
    """Starts a fresh episode and returns the prompt text of turn 0."""
    ...

  def step(self, response: str) -> tuple[str, bool]:
    """Plays ``response`` (the whole model output; the action is parsed from it).

    Returns ``(prompt, done)``: the prompt of the next turn, or ``""`` when the game is over.
    Never raises because of the response's content.
    """
    ...

  def outcome(self) -> Outcome:
    """How the finished game ended (raises RuntimeError while it is still running)."""
    ...

  @property
  def done(self) -> bool:
    """Whether the game is over."""
    ...

  @property
  def prompt(self) -> str:
    """The current turn's prompt text (``""`` once the game is over)."""
    ...

  @property
  def history(self) -> str:
    """The current observation history: the text under ``Current situation:``."""
    ...

  @property
  def turns(self) -> tuple[Turn, ...]:
    """The turns played so far: observation, prompt, response and action of each."""
    ...

  @property
  def final_feedback(self) -> str | None:
    """The closing text once the game is over (None before)."""
    ...

  def trajectory(self, model: ModelInfo, metadata: dict | None = None) -> Trajectory:
    """The finished episode as a trajectory record."""
    ...
