"""The consolidation stage's settings (`ConsolidationConfig`; defaults: the official scripts)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from oel_jax import losses, settings
from oel_jax.train import TrainConfig

MODES = ("on_policy", "off_policy")
CONTEXTS = ("knowledge", "raw_trajectories")


@dataclasses.dataclass(frozen=True)
class ConsolidationConfig:
  """Settings of the consolidation stage (defaults: the official scripts, paper Table 4)."""

  steps: int = settings.integer(20, minimum=1)
  """Optimizer steps (paper: 20 for Qwen3-1.7B/4B FrozenLake, 100 otherwise)."""

  games_per_step: int = settings.integer(64, minimum=1)
  """Games whose prefixes make one batch (official ``data.train_batch_size=64``)."""

  max_prefixes_per_game: int | None = settings.integer(5, minimum=1, optional=True)
  """Most prefixes taken from one game (a seeded subset of its turns beyond that); None for all
  turns. Our games stop after 5 turns, so 5 takes every turn, as officially."""

  max_new_tokens: int = settings.max_new_tokens(1024)
  """Token budget of a sampled reply, reasoning included (official ``max_response_length``)."""

  temperature: float = settings.temperature(0.7)
  """Sampling temperature (official 0.7). Must equal ``train.temperature``, which the loss
  applies to both models' logits."""

  top_p: float = settings.top_p(1.0)
  """Nucleus sampling mass in (0, 1] (official: 1, off)."""

  top_k: int = settings.top_k(0)
  """Top-k sampling cut, 0 for none (official: none)."""

  enable_thinking: bool = settings.boolean(True)
  """Render student and teacher prompts with thinking on (Qwen3 thinking models; the official
  ``not textgame_no_think``). Templates without the flag ignore it."""

  mode: str = settings.choice("on_policy", MODES)
  """``"on_policy"``: the student samples, loss reverse top-k KL (OEL). ``"off_policy"``: the
  knowledge-prompted teacher samples, loss forward KL (``train.divergence`` must be
  `oel_jax.losses.FORWARD_KL`); the paper's baseline."""

  context: str = settings.choice("knowledge", CONTEXTS)
  """What the teacher's context texts are: ``"knowledge"`` (the extracted knowledge set) or
  ``"raw_trajectories"`` (the paper's raw-trajectory baseline: texts from
  `raw_trajectory_contexts`). Recorded with the run; the texts are used the same way."""

  train: TrainConfig = settings.section(TrainConfig)
  """Optimizer and loss settings (learning rate, k, divergence, micro-batches, ...)."""

  seed: int = settings.integer(0, minimum=0)
  """Base seed: each step's games, turns, knowledge draws and sampling seed derive from
  ``(seed, step)``."""

  shuffle: bool = settings.boolean(True)
  """Games are taken in a seeded permutation per pass over the trajectories (True) or in the
  given order (False)."""

  checkpoint_every: int = settings.integer(5, minimum=0)
  """With a workdir, save a checkpoint every this-many steps (and always after the last);
  0: only after the last."""

  keep_checkpoints: int = settings.integer(1, minimum=1)
  """Checkpoints kept in ``workdir/checkpoints`` (older ones are deleted after a newer one is
  complete)."""

  min_length_bucket: int = settings.integer(64, minimum=1)
  """Smallest padded length of the batch's student and teacher sequences (and of its
  responses, unless `max_new_tokens` is smaller)."""

  length_buckets_per_doubling: int = settings.integer(2, minimum=1)
  """Padded sizes per power of two (1: powers of two, at most 2x padding; 2: also 1.5x
  powers, at most 1.5x; more sizes waste less compute and compile more programs). Also used
  for the rows."""

  min_row_bucket: int = settings.integer(1, minimum=1)
  """Smallest padded number of rows in a batch."""

  max_sampling_batch: int | None = settings.integer(None, minimum=1, optional=True)
  """Most prompts per sampler call (the step's prompts are split into several calls); None:
  all in one call."""

  teacher_prefix_cache: bool = settings.boolean(True)
  """Run the frozen teacher once per round over each knowledge text's shared prompt prefix
  (chat-template opening, prompt header, the knowledge) and keep its keys and values on the
  device (`oel_jax.teacher_prefix`); each step's teacher forward then computes only the rest
  of its rows. The same loss and gradients, up to float rounding. False: the teacher reads
  its whole prompt every step, and no cache is held (C texts x cached tokens x layers x 2 x
  kv heads x head_dim values, split over the mesh's ``tp`` and ``fsdp`` axes). Always valid:
  each row uses only the cached tokens its own prompt starts with. May change when a run is
  resumed."""

  max_consecutive_skipped_steps: int = settings.integer(3, minimum=1)
  """A step whose loss or gradient is not finite is skipped (the train state is left exactly
  as it was, as officially; the step still counts and its metrics line says
  ``skipped: true``); this many skipped steps in a row stop the round with
  `oel_jax.train.NonFiniteLossError`. May change when a run is resumed."""

  def __post_init__(self):
    settings.check(self)

  def cross_checks(self, at: settings.At) -> list[str]:
    """The sampling temperature is the loss's, and the mode fixes the divergence's family."""
    out = []
    # Temperature 0 (greedy) is a valid sampling setting; here it is refused through
    # train.temperature (> 0), the loss's own rule.
    if at.ok("temperature", "train.temperature") and not math.isclose(
        self.train.temperature, self.temperature, rel_tol=0, abs_tol=1e-12):
      out.append(f"{at('temperature')} ({self.temperature}) differs from "
                 f"{at('train.temperature')} ({self.train.temperature}): the loss scores the "
                 "replies at the temperature they were sampled at; set both to the same value")
    if at.ok("mode", "train.divergence"):
      divergence = self.train.divergence
      if self.mode == "off_policy" and divergence != losses.FORWARD_KL:
        out.append(f"{at('mode')}='off_policy' trains with the forward KL on teacher samples: "
                   f"set {at('train.divergence')}={losses.FORWARD_KL!r} (got {divergence!r})")
      if self.mode == "on_policy" and divergence == losses.FORWARD_KL:
        out.append(f"{at('mode')}='on_policy' trains with a reverse KL on student samples; "
                   f"{at('train.divergence')}={losses.FORWARD_KL!r} belongs to "
                   "mode='off_policy'")
    return out

  @property
  def sampling_params(self) -> settings.SamplingParams:
    """The settings of each sampler call (student or, off-policy, teacher)."""
    return settings.SamplingParams.of(self)

  def to_dict(self) -> dict[str, Any]:
    """The settings as JSON data (``train`` as a nested object)."""
    return settings.to_dict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> ConsolidationConfig:
    """Builds a config from `to_dict` data; unknown keys are an error."""
    return settings.load(cls, data)
