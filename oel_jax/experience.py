"""Server side, stage 1: extracting experiential knowledge from trajectories.

The model reads its own trajectories and writes down transferable knowledge, one trajectory at a
time, each extraction appended to what came before (arXiv:2603.16856, Eq. 1 and Appendix B.2-B.3;
DESIGN.md section 5.2):

    e_i = truncate(e_{i-1} + extract(tau_i, e_{i-1}), L_max),   i = 1..n

K such accumulations with different seeds form the knowledge set C that consolidation draws from.

    config = ExtractionConfig(knowledge_format="structured", num_trajectories=25, num_runs=10)
    pool = load_pool("round1/extract.jsonl")
    state = run_extraction(pool, config, sampler=sampler, tokenizer=tokenizer,
                           out_dir="round1/knowledge")
    knowledge = load_knowledge_set("round1/knowledge").texts      # K strings

What each piece does, and how it follows the official implementation (microsoft/LMOps,
``oel/verl/verl/trainer/ppo/ray_trainer.py``, ``_validate_textgame`` and ``_truncate_experience``;
``oel/scripts/textgame_extract*.sh`` and ``oel/usage_example.sh`` for the settings):

- `format_trajectory`: each turn as ``\\nRound{i}_Input: <observation>\\n\\nRound{i}_Output:
  <response>`` (``i`` from 0; the response as recorded, reasoning included), then
  ``\\n\\n\\n<final feedback>\\n`` (the official ``textgame_wfeedback=True``, every script's
  setting).
  `Turn.observation` already has the rules paragraph removed, as the official code does for turn 0.
- `extraction_prompt`: the paper's Figure 10 (structured) or 11 (unstructured) template
  (`oel_jax.prompts`), filled with that text and the knowledge so far, or with ``No previous
  experience.`` when there is none yet or when `ExtractionConfig.with_previous` is off (the
  official ``exp_sel_with_prev``; off for Qwen3-1.7B). Sent as one user message through the
  tokenizer's chat template, thinking on or off (`ExtractionConfig.enable_thinking`).
- `parse_extraction`: the reasoning is dropped (the text after the last ``</think>``); then
  structured: every ``- EXPERIENCE ITEM:`` on a line that contains one starts an item (text before
  the first marker on the line is dropped, a line with two markers gives two items, items with
  no text are dropped, trailing spaces removed); unstructured: the whole answer, stripped.
- `accumulate`: ``e_{i-1} + "\\n" + new`` (either side may be empty; an empty extraction leaves the
  knowledge as it was).
- `truncate_knowledge`: above L_max tokens, keep the newest whole items whose token counts
  (each item counted with a trailing newline) sum to at most L_max. Items are lines starting with
  the marker (with any continuation lines) for structured knowledge, single lines for
  unstructured knowledge (as officially). The result never exceeds L_max tokens.
- K runs (`ExtractionConfig.num_runs`): step ``i`` of every run goes to the extractor in **one**
  batched generation call. Sampling: temperature 0.7, top-p 0.8, top-k 20 (the official scripts'
  ``val_kwargs``, used for extraction), at most L_max new tokens (the official extractor's
  ``max_response_length`` is L_max).

Which trajectories each run reads. Officially every run plays its own n games (the same n
boards, in the same order, for every run; the runs differ by their sampling seed, so their games
and extractions differ) and extracts from each game right after playing it. Here the games are
played beforehand and read from trajectory files (the pool), and `ExtractionConfig.pool_order`
says how each run draws its n: ``"shuffle"`` (default) permutes the whole pool with the run's
seed and takes the first n, so every run reads its own order (and, with a pool larger than n,
its own subset); ``"chunks"`` gives run k the k-th block of n trajectories in file order, which is
the official arrangement when the pool holds K plays of the same n boards, run by run.

Resumability. `ExtractionState` (config, each run's trajectory order, step index, knowledge so
far, per-step statistics) is JSON-serialisable (`ExtractionState.to_json` / `from_json`), and
`extraction_step` advances it by one accumulation step. Each step's sampling seed comes from
``(config.seed, step)`` only, so resuming from a saved state gives the same result as an
uninterrupted run. `run_extraction` with ``out_dir`` saves the state after every step
(atomically) and continues from it when called again.

Knowledge set files (`write_knowledge_set`, `load_knowledge_set`): ``knowledge_{k}.txt`` per run
(UTF-8, exactly the knowledge text) and ``manifest.json`` (config, orders, per-step statistics),
all written atomically, the manifest last (its presence means the set is complete).

An extraction that yields nothing (no items, only reasoning) is recorded in the statistics
(``empty``) and the run's knowledge stays as it was; it is not an error.

A reply whose ``<think>`` block never closed (the token budget ran out mid-reasoning) is kept
as raw text, as the official code keeps it: unstructured, the whole reply (stripped) is the
new knowledge; structured, its ``- EXPERIENCE ITEM:`` lines are parsed out of it. Such replies
are counted (``unterminated_reasoning`` per run and step).

Differences from the official code, on purpose: an empty final feedback adds no text
(officially ``"\\n\\n\\n\\n"``); the extractor prompt is never cut (officially it is
right-truncated at ``max_prompt_length``), so the sampler's ``max_seq_len`` must hold it plus the
new tokens (it raises otherwise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from oel_jax import chat, prompts, settings
from oel_jax.atomic_write import atomic_write_text
from oel_jax.envs.trajectory import Trajectory, load_trajectories

_log = logging.getLogger(__name__)

ITEM_PREFIX = "- EXPERIENCE ITEM:"
"""What starts an item of structured knowledge."""

NO_PREVIOUS = "No previous experience."
"""What the prompt shows in place of the knowledge when there is none (official text)."""

FORMATS = ("structured", "unstructured")
PROMPT_VARIANTS = ("paper", "official")
POOL_ORDERS = ("shuffle", "chunks")

STATE_FILE = "extraction_state.json"
"""The state file `run_extraction` keeps in its ``out_dir``."""
MANIFEST_FILE = "manifest.json"
"""A knowledge set's manifest; present only when the set was written completely."""
KNOWLEDGE_FILE = "knowledge_{}.txt"
"""A knowledge set's file for run ``k``."""
SNAPSHOT_DIR = "step_{:04d}"
"""Sub-folder of ``out_dir`` holding the knowledge set as of a step (`snapshot_every`)."""

MANIFEST_KIND = "oel_jax.knowledge_set"
MANIFEST_VERSION = 1
STATE_KIND = "oel_jax.extraction_state"
STATE_VERSION = 1

Conversation = list[dict[str, str]]
ReplyFn = Callable[..., Sequence[Any]]
"""The extractor as a function: ``generate(conversations, *, seed) -> replies``: one reply per conversation, each a ``str``
(the decoded text, reasoning included) or an object with a ``text`` attribute such as
`oel_jax.sampling.ChatCompletion` (``finish_reason`` and ``tokens`` are recorded when present)."""


# ---------------------------------------------------------------------------------------------
# Configuration.


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
  code words them (one phrase differs per prompt; see ``oel_jax/prompts/README.md``)."""

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


# ---------------------------------------------------------------------------------------------
# Text: trajectory formatting, prompts, parsing, accumulation, truncation.


def format_trajectory(trajectory: Trajectory) -> str:
  """The trajectory as the extractor reads it (the prompt's ``latest_experience``).

  ``\\nRound{i}_Input: <observation>\\n\\nRound{i}_Output: <response>`` per turn (``i`` from 0),
  then ``\\n\\n\\n<final_feedback>\\n`` when the trajectory has a final feedback.
  """
  parts = [f"\nRound{i}_Input: {turn.observation}\n\nRound{i}_Output: {turn.response}"
           for i, turn in enumerate(trajectory.turns)]
  if trajectory.final_feedback:
    parts.append(f"\n\n\n{trajectory.final_feedback}\n")
  return "".join(parts)


def prompt_template(config: ExtractionConfig) -> str:
  """The extraction template for the config's knowledge format and prompt variant."""
  name = f"extraction_{config.knowledge_format}"
  if config.prompt_variant == "official":
    name += "_official"
  return prompts.load(name)


def extraction_prompt(trajectory: Trajectory | str, knowledge: str,
                      config: ExtractionConfig) -> str:
  """The extractor's user message for one trajectory, given the run's knowledge so far.

  Args:
    trajectory: a trajectory, or its text from `format_trajectory`.
    knowledge: the knowledge accumulated so far in this run ("" at the start).
    config: picks the template and whether the knowledge is shown (`with_previous`).
  """
  text = trajectory if isinstance(trajectory, str) else format_trajectory(trajectory)
  previous = knowledge if (config.with_previous and knowledge) else NO_PREVIOUS
  return prompt_template(config).format(latest_experience=text, previous_experience=previous)


def drop_reasoning(text: str) -> tuple[str, bool]:
  """Removes a thinking model's reasoning from an extractor reply.

  Returns:
    ``(answer, unterminated)``: the text after the last ``</think>`` (the whole text when there
    is no think block); when the text opens ``<think>`` and never closes it (the token budget ran
    out mid-reasoning), the raw text, as the official code keeps it, and True.
  """
  answer = chat.after_reasoning(text)
  if answer is not None:
    return answer, False
  return text, chat.opens_reasoning(text)


def parse_items(answer: str) -> list[str]:
  """The ``- EXPERIENCE ITEM:`` items of a structured answer, in order (see module docstring)."""
  items = []
  for line in answer.split("\n"):
    if ITEM_PREFIX not in line:
      continue
    for part in line.split(ITEM_PREFIX)[1:]:
      if part.strip():
        items.append(ITEM_PREFIX + part.rstrip())
  return items


def parse_extraction(text: str, knowledge_format: str) -> str:
  """The new knowledge in one extractor reply ("" when it holds none).

  Args:
    text: the decoded reply, reasoning included.
    knowledge_format: ``"structured"`` (one item per line) or ``"unstructured"`` (the answer).
  """
  return _parse_answer(drop_reasoning(text)[0], knowledge_format)


def _parse_answer(answer: str, knowledge_format: str) -> str:
  if knowledge_format == "structured":
    return "\n".join(parse_items(answer))
  if knowledge_format == "unstructured":
    return answer.strip()
  raise ValueError(f"knowledge_format must be one of {FORMATS}, got {knowledge_format!r}")


def accumulate(knowledge: str, new: str) -> str:
  """``knowledge + "\\n" + new``, or whichever of the two is not empty."""
  if knowledge and new:
    return f"{knowledge}\n{new}"
  return new or knowledge


def _is_marker_line(line: str) -> bool:
  return line.strip().startswith(ITEM_PREFIX)


def split_items(knowledge: str, knowledge_format: str) -> list[str]:
  """Splits knowledge into the whole items that truncation keeps or drops.

  Structured: an item is a line starting with ``- EXPERIENCE ITEM:`` (leading spaces allowed)
  plus the lines up to the next such line; lines before the first item form one leading
  non-item entry. Unstructured: every line (empty ones too) is an item, as officially.
  ``"\\n".join(split_items(k, f)) == k`` always; "" gives ``[]``.
  """
  if not knowledge:
    return []
  lines = knowledge.split("\n")
  if knowledge_format == "unstructured":
    return lines
  if knowledge_format != "structured":
    raise ValueError(f"knowledge_format must be one of {FORMATS}, got {knowledge_format!r}")
  items: list[str] = []
  for line in lines:
    if _is_marker_line(line) or not items:
      items.append(line)
    else:
      items[-1] += "\n" + line
  return items


def count_tokens(tokenizer: Any, text: str) -> int:
  """Tokens in ``text`` under ``tokenizer`` (no special tokens added)."""
  if not text:
    return 0
  return len(tokenizer.encode(text, add_special_tokens=False))


def truncate_knowledge(knowledge: str, max_tokens: int, tokenizer: Any,
                       knowledge_format: str) -> str:
  """Keeps the newest whole items of ``knowledge`` within ``max_tokens`` tokens.

  Knowledge within the limit is returned unchanged. Otherwise items (`split_items`) are taken
  from the newest back while the sum of their token counts, each counted with a trailing
  newline, stays within ``max_tokens`` (the official rule); older items, and for structured
  knowledge any text before its first item, are dropped. If the kept items still encode to more
  than ``max_tokens`` tokens together (tokenizers can merge across lines), the oldest of them go
  too. When the newest item alone is too long the result is "".
  """
  if count_tokens(tokenizer, knowledge) <= max_tokens:
    return knowledge
  items = split_items(knowledge, knowledge_format)
  if knowledge_format == "structured" and items and not _is_marker_line(items[0]):
    items = items[1:]
  kept: list[str] = []
  total = 0
  for item in reversed(items):
    n = count_tokens(tokenizer, item + "\n")
    if total + n > max_tokens:
      break
    kept.append(item)
    total += n
  kept.reverse()
  text = "\n".join(kept)
  while kept and count_tokens(tokenizer, text) > max_tokens:
    kept.pop(0)
    text = "\n".join(kept)
  return text


# ---------------------------------------------------------------------------------------------
# Runs: trajectory orders, seeds, state.


def load_pool(*paths: str | os.PathLike[str]) -> list[Trajectory]:
  """Reads trajectory files (JSONL) into one pool, in the order given."""
  pool: list[Trajectory] = []
  for path in paths:
    pool.extend(load_trajectories(path))
  return pool


def pool_digest(pool: Sequence[Trajectory]) -> str:
  """SHA-256 of the pool's records in order (what a resumed run checks it reads the same)."""
  h = hashlib.sha256()
  for trajectory in pool:
    h.update(trajectory.to_json().encode("utf-8"))
    h.update(b"\n")
  return h.hexdigest()


def plan_orders(pool_size: int, config: ExtractionConfig) -> tuple[tuple[int, ...], ...]:
  """Each run's n trajectory indices into the pool, in reading order (see `pool_order`).

  Raises:
    ValueError: the pool holds fewer trajectories than the runs need.
  """
  n, k = config.num_trajectories, config.num_runs
  if config.pool_order == "chunks":
    if pool_size < n * k:
      raise ValueError(f"pool_order='chunks' needs num_runs * num_trajectories = {k} * {n} = "
                       f"{n * k} trajectories; the pool holds {pool_size}")
    return tuple(tuple(range(r * n, (r + 1) * n)) for r in range(k))
  if pool_size < n:
    raise ValueError(f"num_trajectories={n} but the pool holds only {pool_size} trajectories")
  return tuple(
      tuple(int(i) for i in np.random.default_rng([config.seed, r]).permutation(pool_size)[:n])
      for r in range(k))


def step_seed(seed: int, step: int) -> int:
  """The sampling seed of accumulation step ``step`` (shared by the K runs' batched call)."""
  return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class ExtractionState:
  """Where K accumulation runs stand: everything needed to continue them, as JSON data."""

  config: ExtractionConfig
  """The stage's settings."""

  orders: tuple[tuple[int, ...], ...]
  """Per run, the pool indices of its n trajectories in reading order."""

  pool_size: int
  """Trajectories in the pool the orders index."""

  pool_digest: str
  """`pool_digest` of that pool ("" when unknown)."""

  step: int = 0
  """Accumulation steps done (0..n); step ``i`` reads ``orders[k][i]`` in every run ``k``."""

  knowledge: tuple[str, ...] = ()
  """Per run, the knowledge accumulated so far (after truncation); () means all "" (start)."""

  history: tuple[Mapping[str, Any], ...] = ()
  """One JSON record per step done: ``{"step", "seed", "runs": [per-run stats]}``. Per run:
  ``trajectory`` (pool index), ``items`` (new items kept; lines for unstructured), ``empty``,
  ``unterminated_reasoning``, ``finish_reason`` and ``response_tokens`` (None when the
  generator gave plain text), ``knowledge_tokens`` and ``knowledge_items`` (after truncation),
  ``dropped_items`` (items truncation removed this step)."""

  def __post_init__(self):
    k, n = self.config.num_runs, self.config.num_trajectories
    orders = tuple(tuple(int(i) for i in order) for order in self.orders)
    object.__setattr__(self, "orders", orders)
    if not self.knowledge:
      object.__setattr__(self, "knowledge", ("",) * k)
    object.__setattr__(self, "knowledge", tuple(self.knowledge))
    object.__setattr__(self, "history", tuple(self.history))
    if len(orders) != k or any(len(order) != n for order in orders):
      raise ValueError(f"ExtractionState.orders must hold num_runs={k} orders of "
                       f"num_trajectories={n} indices")
    if any(not 0 <= i < self.pool_size for order in orders for i in order):
      raise ValueError(f"ExtractionState.orders index outside the pool [0, {self.pool_size})")
    if len(self.knowledge) != k or not all(isinstance(t, str) for t in self.knowledge):
      raise ValueError(f"ExtractionState.knowledge must hold num_runs={k} strings")
    if not 0 <= self.step <= n:
      raise ValueError(f"ExtractionState.step must be in [0, {n}], got {self.step}")
    if len(self.history) != self.step:
      raise ValueError(f"ExtractionState.history has {len(self.history)} records for "
                       f"{self.step} steps")

  @property
  def done(self) -> bool:
    """Whether every run has read all its trajectories."""
    return self.step >= self.config.num_trajectories

  def to_dict(self) -> dict[str, Any]:
    """The state as JSON data."""
    return {"kind": STATE_KIND, "version": STATE_VERSION, "config": self.config.to_dict(),
            "orders": [list(o) for o in self.orders], "pool_size": self.pool_size,
            "pool_digest": self.pool_digest, "step": self.step,
            "knowledge": list(self.knowledge), "history": [dict(h) for h in self.history]}

  def to_json(self) -> str:
    """The state as one JSON document."""
    return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> ExtractionState:
    """Rebuilds a state from `to_dict` data; raises ValueError naming what is wrong."""
    if not isinstance(data, Mapping) or data.get("kind") != STATE_KIND:
      raise ValueError(f"not an extraction state (expected kind {STATE_KIND!r})")
    if data.get("version") != STATE_VERSION:
      raise ValueError(f"extraction state version {data.get('version')!r} is not supported "
                       f"(expected {STATE_VERSION})")
    missing = [key for key in ("config", "orders", "pool_size", "pool_digest", "step",
                               "knowledge", "history") if key not in data]
    if missing:
      raise ValueError(f"extraction state lacks field(s) {missing}")
    try:
      return cls(config=ExtractionConfig.from_dict(data["config"]),
                 orders=tuple(tuple(o) for o in data["orders"]),
                 pool_size=int(data["pool_size"]), pool_digest=str(data["pool_digest"]),
                 step=int(data["step"]), knowledge=tuple(data["knowledge"]),
                 history=tuple(data["history"]))
    except (TypeError, ValueError) as e:
      raise ValueError(f"invalid extraction state: {e}") from None

  @classmethod
  def from_json(cls, text: str) -> ExtractionState:
    """Parses `to_json` output."""
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"extraction state is not valid JSON: {e}") from None
    return cls.from_dict(data)


def start_extraction(pool: Sequence[Trajectory], config: ExtractionConfig,
                     orders: Sequence[Sequence[int]] | None = None) -> ExtractionState:
  """The state before the first step: empty knowledge, each run's order planned.

  Args:
    pool: the trajectories to read.
    config: the stage's settings.
    orders: each run's pool indices, overriding `plan_orders` (K lists of n indices).
  """
  if orders is None:
    orders = plan_orders(len(pool), config)
  return ExtractionState(config=config, orders=tuple(tuple(o) for o in orders),
                         pool_size=len(pool), pool_digest=pool_digest(pool))


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


# ---------------------------------------------------------------------------------------------
# Files.


def save_state(path: str | os.PathLike[str], state: ExtractionState) -> None:
  """Writes the state as JSON, atomically."""
  atomic_write_text(path, state.to_json())


def load_state(path: str | os.PathLike[str]) -> ExtractionState:
  """Reads a state written by `save_state`; errors name the file."""
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    return ExtractionState.from_json(text)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def write_knowledge_set(folder: str | os.PathLike[str], state: ExtractionState) -> list[str]:
  """Writes ``knowledge_{k}.txt`` per run and then ``manifest.json`` into ``folder``.

  Any old manifest is removed first, so a manifest is only ever next to the files it names.

  Returns:
    The knowledge file paths, by run.
  """
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  manifest_path = os.path.join(folder, MANIFEST_FILE)
  if os.path.exists(manifest_path):
    os.unlink(manifest_path)
  names = [KNOWLEDGE_FILE.format(k) for k in range(len(state.knowledge))]
  for name, text in zip(names, state.knowledge):
    atomic_write_text(os.path.join(folder, name), text)
  last = state.history[-1]["runs"] if state.history else []
  manifest = {
      "kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "files": names,
      "steps": state.step, "complete": state.done,
      "knowledge_tokens": [r["knowledge_tokens"] for r in last],
      "knowledge_items": [r["knowledge_items"] for r in last],
      "empty_extractions": sum(r["empty"] for h in state.history for r in h["runs"]),
      "unterminated_replies": sum(bool(r.get("unterminated_reasoning"))
                                  for h in state.history for r in h["runs"]),
      "config": state.config.to_dict(), "orders": [list(o) for o in state.orders],
      "pool_size": state.pool_size, "pool_digest": state.pool_digest,
      "history": [dict(h) for h in state.history],
  }
  atomic_write_text(manifest_path, json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
  return [os.path.join(folder, name) for name in names]


@dataclasses.dataclass(frozen=True)
class KnowledgeSet:
  """A knowledge set read from files: the K knowledge texts and their manifest."""

  texts: tuple[str, ...]
  """The knowledge texts, by run (a text may be "" when a run extracted nothing)."""

  manifest: Mapping[str, Any]
  """The manifest's JSON data ({} for a single text file)."""

  path: str
  """The folder (or file) it was read from."""

  def __len__(self) -> int:
    return len(self.texts)


def load_knowledge_set(path: str | os.PathLike[str]) -> KnowledgeSet:
  """Reads a knowledge set folder written by `write_knowledge_set` (or one ``.txt`` file).

  Raises:
    FileNotFoundError: the folder has no manifest (not a knowledge set, or one whose writing
      was interrupted) or a file it names is missing.
    ValueError: the manifest is malformed.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return KnowledgeSet(texts=(f.read(),), manifest={}, path=path)
  manifest_path = os.path.join(path, MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(
        f"{path}: not a knowledge set ({MANIFEST_FILE} missing; if an extraction was "
        "interrupted there, run it again to finish)")
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{manifest_path}: invalid JSON: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
    raise ValueError(f"{manifest_path}: not a knowledge set manifest (kind must be "
                     f"{MANIFEST_KIND!r})")
  files = manifest.get("files")
  if (not isinstance(files, list) or not files or
      not all(isinstance(n, str) and n and os.path.basename(n) == n for n in files)):
    raise ValueError(f"{manifest_path}: files: expected a non-empty list of file names")
  texts = []
  for name in files:
    file_path = os.path.join(path, name)
    if not os.path.isfile(file_path):
      raise FileNotFoundError(f"{manifest_path}: names {name}, which is missing")
    with open(file_path, encoding="utf-8") as f:
      texts.append(f.read())
  return KnowledgeSet(texts=tuple(texts), manifest=manifest, path=path)


# ---------------------------------------------------------------------------------------------
# The stage.


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
