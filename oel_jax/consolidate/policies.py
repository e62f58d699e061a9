"""Who samples the replies: one strategy object per `ConsolidationConfig.mode`.

The two modes differ only in which prompts the sampler answers and whose weights it holds
when; a new mode is an object with the same methods, its name in `MODES` and `POLICIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from oel_jax.consolidate import inputs as inputs_lib
from oel_jax.consolidate.config import ConsolidationConfig
from oel_jax.consolidate.inputs import Prefix, StepInputs, encode_prompt
from oel_jax.train import TrainState

# ---------------------------------------------------------------------------------------------
# Who samples the replies: the two modes.


@dataclasses.dataclass(frozen=True)
class OnPolicy:
  """The student samples the replies (OEL): the sampler is given the train state's weights
  before every sampling.

  The sampler shares the state's buffers (no copy). The train step donates them, so the
  sampler's hold on them ends at the next step, taken or skipped; hence the sync before each
  sampling rather than after each step.
  """

  def prompts(self, inputs: StepInputs) -> tuple[tuple[int, ...], ...]:
    """The prompts the sampler answers: the student's (no knowledge)."""
    return inputs.student_prompts

  def longest_prompt(self, tokenizer: Any, prefix: Prefix, student_ids: Sequence[int],
                     knowledge: Sequence[str], config: ConsolidationConfig) -> int:
    """Tokens of the longest prompt the sampler will be given (``prefix`` is the longest)."""
    del tokenizer, prefix, knowledge, config
    return len(student_ids)

  def start(self, sampler: Any, teacher_params: Any) -> None:
    """Before the first step: nothing (each sampling syncs the student)."""
    del sampler, teacher_params

  def before_sampling(self, sampler: Any, state: TrainState) -> None:
    """Puts the student's current weights into the sampler."""
    sampler.update_weights(state.params)

  def finish(self, sampler: Any, state: TrainState) -> None:
    """At the end: the final student."""
    sampler.update_weights(state.params)


@dataclasses.dataclass(frozen=True)
class OffPolicy:
  """The knowledge-prompted teacher samples the replies (the paper's off-policy baseline): the
  sampler holds the teacher's weights until the end, then the final student's."""

  def prompts(self, inputs: StepInputs) -> tuple[tuple[int, ...], ...]:
    """The prompts the sampler answers: the teacher's (with knowledge)."""
    return inputs.teacher_prompts

  def longest_prompt(self, tokenizer: Any, prefix: Prefix, student_ids: Sequence[int],
                     knowledge: Sequence[str], config: ConsolidationConfig) -> int:
    """Tokens of the longest prompt: the longest prefix with the longest knowledge text."""
    del student_ids
    widest = max(knowledge, key=len)
    return len(encode_prompt(tokenizer, inputs_lib.teacher_prefix(prefix, widest),
                             enable_thinking=config.enable_thinking))

  def start(self, sampler: Any, teacher_params: Any) -> None:
    """Puts the teacher's weights (frozen, never donated) into the sampler."""
    sampler.update_weights(teacher_params)

  def before_sampling(self, sampler: Any, state: TrainState) -> None:
    """The teacher keeps sampling: nothing changes."""
    del sampler, state

  def finish(self, sampler: Any, state: TrainState) -> None:
    """The sampler ends holding the final student, as on-policy."""
    sampler.update_weights(state.params)


POLICIES = {"on_policy": OnPolicy(), "off_policy": OffPolicy()}
"""The sampling strategy of each `ConsolidationConfig.mode`."""
