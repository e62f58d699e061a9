"""The extraction stage's settings (`ExtractionConfig`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from oel_jax import settings

FORMATS = ("structured", "unstructured")
PROMPT_VARIANTS = ("paper", "official")
POOL_ORDERS = ("shuffle", "chunks")


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
  """Settings of the extraction stage (defaults: the paper's Qwen3-4B FrozenLake row, Table 4)."""

  knowledge_format: str = settings.choice("structured", FORMATS)
  """``"structured"`` (Fig. 10 prompt; keep ``- EXPERIENCE ITEM:`` items) or ``"unstructured"``
  (Fig. 11 prompt; keep the whole answer). Paper: unstructured for Qwen3-1.7B, else structured."""

  with_previous: bool = settings.boolean(True)
  """Show the knowledge accumulated so far in each extraction prompt (else the prompt says
  ``No previous experience.``). Paper: off for Qwen3-1.7B, on otherwise."""

  num_trajectories: int = settings.integer(25, minimum=1)
  """n: accumulation steps per run, one trajectory each (paper: 15, 25 or 50)."""

  num_runs: int = settings.integer(10, minimum=1)
  """K: independent accumulation runs, one knowledge text each (paper: 10)."""

  max_knowledge_tokens: int = settings.integer(8192, minimum=1)
  """L_max: most tokens the accumulated knowledge may hold, counted with the extractor's
  tokenizer; older whole items are dropped beyond it (paper: 8192 structured, 2048
  unstructured)."""

  max_new_tokens: int | None = settings.max_new_tokens(None, optional=True)
  """Most tokens the extractor may generate per call (reasoning included); None means
  `max_knowledge_tokens`, as officially."""

  temperature: float = settings.temperature(0.7)
  """Extractor sampling temperature (official extraction scripts: 0.7)."""

  top_p: float = settings.top_p(0.8)
  """Extractor nucleus sampling mass (official extraction scripts: 0.8)."""

  top_k: int = settings.top_k(20)
  """Extractor top-k sampling cut, 0 for none (official extraction scripts: 20)."""

  enable_thinking: bool = settings.boolean(True)
  """Render extraction prompts with thinking on (Qwen3 thinking models: the paper's 1.7B, 4B
  and 8B; the official ``not textgame_no_think``). Templates without the flag ignore it."""

  seed: int = settings.integer(0, minimum=0)
  """Base seed: each run's trajectory order and each step's sampling seed derive from it."""

  prompt_variant: str = settings.choice("paper", PROMPT_VARIANTS)
  """``"paper"``: the templates worded as Figures 10 and 11; ``"official"``: as the official
  code words them (one phrase differs per prompt; see ``oel_jax/prompts/README.md``). Games
  only: recorded conversations are always extracted with our conversation templates."""

  pool_order: str = settings.choice("chunks", POOL_ORDERS)
  """How each run draws its n trajectories from the pool: ``"chunks"`` (run k reads
  trajectories k*n .. k*n+n-1 in file order, the official way; the pool must hold K*n) or
  ``"shuffle"`` (a seeded permutation of the pool per run, first n)."""

  snapshot_every: int = settings.integer(0, minimum=0)
  """`run_extraction` also writes the knowledge set as of every this-many steps to
  ``out_dir/step_XXXX/`` (for pass rate by accumulation step); 0 for none."""

  def __post_init__(self):
    settings.check(self)

  @property
  def generation_tokens(self) -> int:
    """The extractor's token budget per call (`max_new_tokens`, else `max_knowledge_tokens`)."""
    return self.max_knowledge_tokens if self.max_new_tokens is None else self.max_new_tokens

  @property
  def sampling_params(self) -> settings.SamplingParams:
    """The settings of each extractor call."""
    return settings.SamplingParams.of(self, self.generation_tokens)

  def to_dict(self) -> dict[str, Any]:
    """The settings as JSON data."""
    return settings.to_dict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> ExtractionConfig:
    """Builds a config from `to_dict` data; unknown keys are an error."""
    return settings.load(cls, data)
