"""IF-Eval prompts and scoring: strict and loose, prompt-level and instruction-level.

Scoring follows google-research ``instruction_following_eval/evaluation_lib.py``:

* **strict**: an instruction is followed when the response is not blank and its checker
  accepts the response as it is;
* **loose**: followed when the checker accepts any of eight variants of the response: the
  response, the response without its first line, without its last line, without both
  (each of those three stripped of surrounding whitespace), and each of those four with
  every ``*`` removed. Loose is an upper bound that forgives a leading "Sure, here it is:"
  line, a closing remark, or markdown emphasis;
* **prompt-level** accuracy: the share of prompts whose every instruction is followed;
  **instruction-level**: the share of all instructions followed (pooled over prompts);
* **per type**: instruction-level accuracy for each instruction id.

    examples = load_examples("../shared/data/ifeval/input_data.jsonl")
    scores = score_responses(examples, responses)    # responses in example order
    scores.prompt_level_strict, scores.to_dict()
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from oel_jax.ifeval import checkers

HF_DATASET = "google/IFEval"


@dataclasses.dataclass(frozen=True)
class IFEvalExample:
  """One IF-Eval prompt with its instructions."""

  key: int
  """The prompt's id in the data (``key``)."""
  prompt: str
  """The user message the model answers."""
  instruction_ids: tuple[str, ...]
  """The instructions the prompt carries (``instruction_id_list``), in order."""
  kwargs: tuple[Mapping[str, Any], ...]
  """Per instruction, its arguments (None entries dropped, checked against the checker)."""


def _example_from_record(record: Any, where: str) -> IFEvalExample:
  if not isinstance(record, Mapping):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  for field, kind in (("key", int), ("prompt", str), ("instruction_id_list", list),
                      ("kwargs", list)):
    if field not in record:
      raise ValueError(f"{where}: missing field {field!r}")
    if not isinstance(record[field], kind) or isinstance(record[field], bool):
      raise ValueError(f"{where}: field {field!r} must be a {kind.__name__}, got "
                       f"{type(record[field]).__name__}")
  ids, kwargs = record["instruction_id_list"], record["kwargs"]
  if len(ids) != len(kwargs):
    raise ValueError(f"{where}: 'instruction_id_list' has {len(ids)} entries but 'kwargs' "
                     f"has {len(kwargs)}")
  cleaned = []
  for i, (instruction_id, kw) in enumerate(zip(ids, kwargs)):
    if kw is not None and not isinstance(kw, Mapping):
      raise ValueError(f"{where}: field 'kwargs'[{i}] must be an object, got "
                       f"{type(kw).__name__}")
    try:
      cleaned.append(checkers.clean_kwargs(instruction_id, kw))
    except ValueError as e:
      raise ValueError(f"{where}: instruction {i}: {e}") from None
  return IFEvalExample(key=record["key"], prompt=record["prompt"],
                       instruction_ids=tuple(ids), kwargs=tuple(cleaned))


def load_examples(path: str | os.PathLike | None = None, *, limit: int | None = None
                  ) -> list[IFEvalExample]:
  """Reads IF-Eval prompts.

  Args:
    path: a JSON-lines file in the original format (``key``, ``prompt``,
      ``instruction_id_list``, ``kwargs``), e.g. google-research's
      ``instruction_following_eval/data/input_data.jsonl``. None loads the
      ``google/IFEval`` dataset with the optional ``datasets`` package (network or cache).
    limit: keep only the first `limit` prompts.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a malformed line (the message names the file, line and field).
    ImportError: `path` is None and ``datasets`` is not installed.
  """
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  examples = []
  if path is None:
    try:
      import datasets  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("load_examples(path=None) reads the google/IFEval dataset with the "
                        "'datasets' package, which is not installed; pip install datasets, "
                        "or pass the path of input_data.jsonl") from e
    rows = datasets.load_dataset(HF_DATASET, split="train")
    for i, row in enumerate(rows):
      if limit is not None and len(examples) >= limit:
        break
      examples.append(_example_from_record(row, f"{HF_DATASET} row {i}"))
  else:
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, start=1):
        if limit is not None and len(examples) >= limit:
          break
        if not line.strip():
          continue
        where = f"{path}:{line_no}"
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        examples.append(_example_from_record(record, where))
  return examples


def loose_variants(response: str) -> tuple[str, ...]:
  """The eight responses the loose score tries (see the module docstring), original first."""
  lines = response.split("\n")
  without_first = "\n".join(lines[1:]).strip()
  without_last = "\n".join(lines[:-1]).strip()
  without_both = "\n".join(lines[1:-1]).strip()
  return (response, response.replace("*", ""), without_first, without_last, without_both,
          without_first.replace("*", ""), without_last.replace("*", ""),
          without_both.replace("*", ""))


def _follows(instruction_id: str, kwargs: Mapping[str, Any], response: str) -> bool:
  return bool(response.strip()) and checkers.check_instruction(instruction_id, response, kwargs)


@dataclasses.dataclass(frozen=True)
class PromptScore:
  """The verdicts for one prompt's response."""

  key: int
  """The prompt's ``key``."""
  instruction_ids: tuple[str, ...]
  """The prompt's instructions, in order."""
  strict: tuple[bool, ...]
  """Per instruction: followed by the response as it is."""
  loose: tuple[bool, ...]
  """Per instruction: followed by at least one loose variant."""

  @property
  def all_strict(self) -> bool:
    """Every instruction followed (strict)."""
    return all(self.strict)

  @property
  def all_loose(self) -> bool:
    """Every instruction followed (loose)."""
    return all(self.loose)

  def to_dict(self) -> dict[str, Any]:
    return {"key": self.key, "instruction_ids": list(self.instruction_ids),
            "strict": list(self.strict), "loose": list(self.loose)}


def score_example(example: IFEvalExample, response: str) -> PromptScore:
  """Scores one response against its prompt's instructions, strict and loose."""
  if not isinstance(response, str):
    raise TypeError(f"prompt {example.key}: response must be a str, got "
                    f"{type(response).__name__}")
  variants = loose_variants(response)
  strict, loose = [], []
  for instruction_id, kwargs in zip(example.instruction_ids, example.kwargs):
    ok = _follows(instruction_id, kwargs, response)
    strict.append(ok)
    loose.append(ok or any(_follows(instruction_id, kwargs, v) for v in variants[1:]))
  return PromptScore(example.key, example.instruction_ids, tuple(strict), tuple(loose))


@dataclasses.dataclass(frozen=True)
class TypeAccuracy:
  """Instruction-level accuracy for one instruction id."""

  count: int
  """How many instructions of this id were scored."""
  strict: float
  """Share followed, strict."""
  loose: float
  """Share followed, loose."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class IFEvalScores:
  """IF-Eval accuracies over a set of responses."""

  num_prompts: int
  """Prompts scored."""
  num_instructions: int
  """Instructions scored (over all prompts)."""
  prompt_level_strict: float
  """Share of prompts with every instruction followed, strict (the paper's headline)."""
  instruction_level_strict: float
  """Share of instructions followed, strict."""
  prompt_level_loose: float
  """Share of prompts with every instruction followed, loose."""
  instruction_level_loose: float
  """Share of instructions followed, loose."""
  per_type: Mapping[str, TypeAccuracy]
  """Instruction id -> its accuracy, ids sorted."""
  prompts: tuple[PromptScore, ...]
  """Per prompt, its verdicts, in the order scored."""

  def to_dict(self, *, include_prompts: bool = True) -> dict[str, Any]:
    """A JSON-ready dict; `include_prompts=False` leaves out the per-prompt verdicts."""
    out = {
        "num_prompts": self.num_prompts,
        "num_instructions": self.num_instructions,
        "prompt_level_strict": self.prompt_level_strict,
        "instruction_level_strict": self.instruction_level_strict,
        "prompt_level_loose": self.prompt_level_loose,
        "instruction_level_loose": self.instruction_level_loose,
        "per_type": {k: v.to_dict() for k, v in self.per_type.items()},
    }
    if include_prompts:
      out["prompts"] = [p.to_dict() for p in self.prompts]
    return out


def _share(hits: int, total: int) -> float:
  return hits / total if total else 0.0


def aggregate(prompt_scores: Sequence[PromptScore]) -> IFEvalScores:
  """Prompt-level, instruction-level and per-type accuracies of per-prompt verdicts."""
  per_type: dict[str, list[int]] = {}
  for p in prompt_scores:
    for instruction_id, s, l in zip(p.instruction_ids, p.strict, p.loose):
      counts = per_type.setdefault(instruction_id, [0, 0, 0])
      counts[0] += 1
      counts[1] += s
      counts[2] += l
  n_prompts = len(prompt_scores)
  n_inst = sum(len(p.strict) for p in prompt_scores)
  return IFEvalScores(
      num_prompts=n_prompts,
      num_instructions=n_inst,
      prompt_level_strict=_share(sum(p.all_strict for p in prompt_scores), n_prompts),
      instruction_level_strict=_share(sum(sum(p.strict) for p in prompt_scores), n_inst),
      prompt_level_loose=_share(sum(p.all_loose for p in prompt_scores), n_prompts),
      instruction_level_loose=_share(sum(sum(p.loose) for p in prompt_scores), n_inst),
      per_type={k: TypeAccuracy(c[0], c[1] / c[0], c[2] / c[0])
                for k, c in sorted(per_type.items())},
      prompts=tuple(prompt_scores))


def score_responses(examples: Sequence[IFEvalExample], responses: Sequence[str]
                    ) -> IFEvalScores:
  """Scores `responses[i]` against `examples[i]` (the same length, the same order)."""
  if len(examples) != len(responses):
    raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
  return aggregate([score_example(e, r) for e, r in zip(examples, responses)])
