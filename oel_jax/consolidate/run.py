"""The run: inputs checked and rendered once, a train state restored or made, then steps.

`run_consolidation` checks and renders its inputs once (`_inputs`), restores the latest
checkpoint or makes a fresh train state (`checkpoints.start_state`), and runs the steps
(`_run_steps`), each one `_Stepper` call (sample, batch, train step) and a metrics line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from oel_jax import chat, engine
from oel_jax.consolidate import checkpoints as ckpt
from oel_jax.consolidate.config import ConsolidationConfig
from oel_jax.consolidate.inputs import (Prefix, build_batch, build_prefixes, encode_prompt,
                                        group_by_game, sampling_seed, step_inputs,
                                        teacher_prefix_ids)
from oel_jax.consolidate.policies import POLICIES, OffPolicy, OnPolicy
from oel_jax.envs import Trajectory
from oel_jax.models.qwen3 import Qwen3
from oel_jax.sampling import Sampler, bucket_size
from oel_jax.teacher_prefix import KnowledgePrefix
from oel_jax.train import DistillBatch, NonFiniteLossError, Trainer, TrainState

_log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class ConsolidationResult:
  """What `run_consolidation` returns."""

  model: Qwen3
  """The consolidated student (a `Qwen3` holding the final weights; shares `state`'s arrays)."""

  metrics: tuple[dict[str, Any], ...]
  """One dict per step, steps 1..`config.steps` in order (also ``workdir/metrics.jsonl``)."""

  state: TrainState
  """The final train state (parameters, optimizer state, step)."""

  resumed_from: int
  """The checkpoint step the run continued from (0: it started fresh)."""

  skipped_steps: int = 0
  """Steps of the round (before a resume too) skipped for a non-finite loss or gradient;
  ``state.step`` counts the optimizer steps taken, ``config.steps - skipped_steps``."""


def _check_knowledge(knowledge: Any) -> tuple[str, ...]:
  if isinstance(knowledge, (str, bytes)):
    raise TypeError("knowledge must be a sequence of texts (the knowledge set), not a single "
                    "string; wrap one text as [text]")
  try:
    texts = tuple(knowledge)
  except TypeError:
    raise TypeError(f"knowledge must be a sequence of str, got {type(knowledge).__name__}"
                    ) from None
  if not texts:
    raise ValueError("the knowledge set is empty: consolidation needs at least one knowledge "
                     "text (run the extraction stage first)")
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"knowledge[{i}] is a {type(t).__name__}, not a str")
  if not any(texts):
    _log.warning("every knowledge text is empty: the teacher sees the same prompt as the "
                    "student, so consolidation only pulls the student toward the round-start "
                    "model")
  return texts


def _check_prefixes(prefixes: Sequence[Prefix]) -> None:
  """Each prefix renders with a knowledge text (a recorded game prompt must be knowledge-free)."""
  for p in prefixes:
    try:
      p.format.messages(p.content, "x")
    except ValueError as e:
      raise ValueError(f"trajectory {p.game}, turn {p.turn}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Inputs:
  """A run's data, checked and rendered once."""

  prefixes: list[Prefix]
  """Every turn of every trajectory."""
  games: list[list[int]]
  """Prefix indices per game."""
  knowledge: tuple[str, ...]
  """The context texts."""
  student_ids: dict[int, tuple[int, ...]]
  """Each prefix's student prompt, rendered."""
  longest: int
  """Tokens of the longest prompt the sampler will answer."""
  fingerprint: dict[str, Any]
  """What a checkpoint must match to be resumed from."""


def _check_inputs(student: Qwen3, teacher: Qwen3, trajectories: Any, knowledge: Any,
                  config: Any) -> tuple[list[Prefix], tuple[str, ...]]:
  if not isinstance(config, ConsolidationConfig):
    raise TypeError(f"config must be a ConsolidationConfig, got {type(config).__name__}")
  if isinstance(trajectories, (str, bytes)):
    raise TypeError("trajectories must be a sequence of Trajectory records (read a file with "
                    "oel_jax.envs.load_trajectories)")
  trajectories = list(trajectories)
  if not trajectories:
    raise ValueError("no consolidation trajectories: consolidation needs at least one "
                     "trajectory with a turn")
  prefixes = build_prefixes(trajectories)
  if not prefixes:
    raise ValueError(f"the {len(trajectories)} consolidation trajectories have no turns: "
                     "there is no prefix to train on")
  knowledge = _check_knowledge(knowledge)
  _check_prefixes(prefixes)
  if not isinstance(student, Qwen3) or not isinstance(teacher, Qwen3):
    raise TypeError("student and teacher must be oel_jax.models.Qwen3 models")
  if teacher.config != student.config:
    raise ValueError(f"teacher and student architectures differ: {teacher.config} vs "
                     f"{student.config}")
  return prefixes, knowledge


def _inputs(student: Qwen3, teacher: Qwen3, tokenizer: Any, trajectories: Any, knowledge: Any,
            config: ConsolidationConfig) -> _Inputs:
  """Checks the inputs (raising before any work) and renders the student prompts."""
  prefixes, knowledge = _check_inputs(student, teacher, trajectories, knowledge, config)
  student_ids: dict[int, tuple[int, ...]] = {}
  longest = 0
  for i, p in enumerate(prefixes):
    student_ids[i] = tuple(encode_prompt(tokenizer, p, enable_thinking=config.enable_thinking))
    if len(student_ids[i]) > len(student_ids[longest]):
      longest = i
  need = POLICIES[config.mode].longest_prompt(tokenizer, prefixes[longest], student_ids[longest],
                                              knowledge, config)
  fingerprint = {
      "config": {k: v for k, v in config.to_dict().items() if k not in ckpt.RESUMABLE_FIELDS},
      "model": repr(student.config),
      "prefixes": ckpt.prefix_digest(prefixes, student_ids),
      "knowledge": ckpt.digest(list(knowledge)),
  }
  return _Inputs(prefixes=prefixes, games=group_by_game(prefixes), knowledge=knowledge,
                 student_ids=student_ids, longest=need,
                 fingerprint=json.loads(json.dumps(fingerprint)))


@dataclasses.dataclass(frozen=True)
class _StepResult:
  """One step's new state and what its metrics line reports."""

  state: TrainState
  """The train state after the step (unchanged when skipped)."""
  metrics: dict[str, Any]
  """`Trainer.train_step`'s metrics."""
  batch: DistillBatch
  """The step's padded batch."""
  responses: list[list[int]]
  """The sampled replies."""
  reasons: list[str]
  """Their finish reasons."""
  sampling_time: float
  """Seconds spent sampling."""


@dataclasses.dataclass(frozen=True)
class _Stepper:
  """What every step uses: the data, the models' programs and the sampling strategy."""

  inputs: _Inputs
  """The run's data."""
  tokenizer: Any
  """The models' tokenizer."""
  config: ConsolidationConfig
  """The stage's settings."""
  sampler: Any
  """The sampler (weights per `policy`)."""
  trainer: Trainer
  """The train step."""
  teacher_params: Any
  """The frozen teacher's parameters."""
  pad_id: int
  """The padding token."""
  row_multiple: int
  """Rows per batch are a multiple of this (micro-batches x data-parallel devices)."""
  policy: OnPolicy | OffPolicy
  """Who samples the replies."""
  teacher_prefix: KnowledgePrefix | None = None
  """The teacher's cached knowledge prefixes (``config.teacher_prefix_cache``), or None."""

  def __call__(self, state: TrainState, step: int) -> _StepResult:
    """Step ``step`` (1-based): sample the replies, build the batch, take the train step."""
    d, config = self.inputs, self.config
    inputs = step_inputs(d.prefixes, d.games, d.knowledge, self.tokenizer, config, step,
                         d.student_ids)

    def answer(chunk: list[tuple[int, ...]], index: int) -> list[tuple[list[int], str]]:
      return engine.replies(self.sampler.generate(
          [list(p) for p in chunk], **config.sampling_params.generate_kwargs(),
          seed=sampling_seed(config.seed, step, index)))

    self.policy.before_sampling(self.sampler, state)
    t0 = time.perf_counter()
    replies = engine.in_chunks(self.policy.prompts(inputs), config.max_sampling_batch, answer)
    sampling_time = time.perf_counter() - t0
    responses = [toks for toks, _ in replies]
    reasons = [reason for _, reason in replies]
    cached = self.teacher_prefix
    batch = build_batch(inputs.student_prompts, inputs.teacher_prompts, responses,
                        pad_id=self.pad_id, config=config, row_multiple=self.row_multiple,
                        contexts=None if cached is None else inputs.contexts,
                        prefix_ids=None if cached is None else cached.ids)
    state, m = self.trainer.train_step(state, self.teacher_params, batch, teacher_prefix=cached,
                                       skip_non_finite=True)
    return _StepResult(state=state, metrics=m, batch=batch, responses=responses,
                       reasons=reasons, sampling_time=sampling_time)


def _step_line(r: _StepResult, step: int, skipped_steps: int, num_games: int,
               config: ConsolidationConfig, t_step: float) -> dict[str, Any]:
  """The metrics line of a step."""
  m, batch, responses, reasons = r.metrics, r.batch, r.responses, r.reasons
  generated = sum(len(x) for x in responses)
  position = step * config.games_per_step
  line = {
      "step": step,
      "loss": m["loss"], "grad_norm": m["grad_norm"],
      "student_entropy": m["student_entropy"], "teacher_entropy": m["teacher_entropy"],
      "student_topk_mass": m["student_topk_mass"],
      "teacher_topk_mass": m["teacher_topk_mass"],
      "tokens": m["tokens"], "skipped": not m["finite"], "skipped_steps": skipped_steps,
      "rows": len(responses), "padded_rows": int(batch.batch_size),
      "games": config.games_per_step, "epoch": (position - 1) // num_games,
      "games_consumed": position,
      "student_len": int(batch.student_ids.shape[1]),
      "teacher_len": int(batch.teacher_ids.shape[1]),
      # Mean prompt tokens per row the teacher read from its cached knowledge prefix (0: off).
      "teacher_cached_tokens": (0.0 if batch.teacher_prefix_len is None else
                                float(np.mean(np.asarray(batch.teacher_prefix_len)))),
      "response_len": int(batch.response_mask.shape[1]),
      "mean_response_tokens": generated / len(responses),
      "truncated_fraction": sum(x == "length" for x in reasons) / len(reasons),
      "sampling_time": r.sampling_time, "train_time": m["step_time"],
      "tokens_per_second": m["tokens_per_second"],
      "sampled_tokens_per_second": generated / max(r.sampling_time, 1e-9),
      "step_time": time.perf_counter() - t_step,
  }
  return {k: ckpt.json_number(v) for k, v in line.items()}


def _make_trainer(trainer: Trainer | None, student: Qwen3, config: ConsolidationConfig,
                  mesh: jax.sharding.Mesh | None) -> Trainer:
  if trainer is None:
    return Trainer(student, config.train, mesh=mesh)
  if trainer.config != config.train or trainer.model_config != student.config:
    raise ValueError("the trainer given was built for another TrainConfig or architecture "
                     "than config.train and the student's")
  return trainer


def _check_sampler_fits(sampler: Any, longest: int, config: ConsolidationConfig) -> None:
  """Raises when a given sampler cannot hold the longest prompt and a whole reply."""
  if sampler is not None and longest + config.max_new_tokens > getattr(
      sampler, "max_seq_len", math.inf):
    raise ValueError(f"the sampler's max_seq_len ({sampler.max_seq_len}) cannot hold the "
                     f"longest prompt ({longest} tokens) plus max_new_tokens "
                     f"({config.max_new_tokens})")


def run_consolidation(student: Qwen3, teacher: Qwen3, tokenizer: Any,
                      trajectories: Sequence[Trajectory], knowledge: Sequence[str],
                      config: ConsolidationConfig, *, workdir: str | os.PathLike[str] | None = None,
                      mesh: jax.sharding.Mesh | None = None, sampler: Any = None,
                      trainer: Trainer | None = None, progress: bool = True,
                      on_step: Callable[[int, dict[str, Any]], None] | None = None
                      ) -> ConsolidationResult:
  """Consolidates the knowledge into the student by (on-policy) context distillation.

  Args:
    student: the model to train; its own arrays are not modified.
    teacher: the frozen round-start model (may be the same object as ``student``); never
      modified. Must have the student's architecture.
    tokenizer: the models' transformers tokenizer (chat template, stop tokens).
    trajectories: the consolidation trajectories; every turn is a prefix.
    knowledge: the knowledge set C (`oel_jax.experience.load_knowledge_set(...).texts`), or the
      raw-trajectory contexts for ``config.context="raw_trajectories"``.
    config: the stage's settings.
    workdir: folder for checkpoints (``checkpoints/``) and ``metrics.jsonl``; a run there is
      continued from its latest checkpoint. None: nothing is written, no resume.
    mesh: device mesh for the train step (and for a sampler made here); ignored when
      ``trainer`` is given (its own mesh is used).
    sampler: an `oel_jax.sampling.Sampler` of this architecture to reuse (compiled programs);
      its weights are replaced. Made here when None. On return it holds the final weights.
    trainer: an `oel_jax.train.Trainer` of this architecture with ``config.train`` to reuse
      (compiled steps); made here when None.
    progress: show a tqdm progress bar.
    on_step: called as ``on_step(step, metrics)`` after every step (after its checkpoint).

  Returns:
    A `ConsolidationResult`.

  Raises:
    ValueError / TypeError: bad inputs (no trajectories or turns, an empty knowledge set, a
      prompt that already holds knowledge, mismatched models, a checkpoint of another run in
      ``workdir``), before any work.
    oel_jax.train.NonFiniteLossError: ``config.max_consecutive_skipped_steps`` steps in a row
      had a non-finite loss or gradient (each was skipped; the last one's metrics line is
      written, no checkpoint of it; the error's ``.state`` is the unchanged train state).
  """
  data = _inputs(student, teacher, tokenizer, trajectories, knowledge, config)
  trainer = _make_trainer(trainer, student, config, mesh)
  _check_sampler_fits(sampler, data.longest, config)
  checkpoints, metrics_path = ckpt.open_workdir(workdir, config)
  try:
    state, history, start = ckpt.start_state(checkpoints, metrics_path, data.fingerprint, config,
                                             trainer, student)
    stepper = _stepper(data, tokenizer, config, sampler, trainer, teacher, state)
    stepper.policy.start(stepper.sampler, stepper.teacher_params)
    state, history = _run_steps(stepper, state, history, start, checkpoints, metrics_path,
                                progress, on_step)
  finally:
    if checkpoints is not None:
      checkpoints.close()
  stepper.policy.finish(stepper.sampler, state)
  return ConsolidationResult(model=trainer.student(state), metrics=tuple(history), state=state,
                             resumed_from=start, skipped_steps=ckpt.skip_counts(history)[0])


def _stepper(data: _Inputs, tokenizer: Any, config: ConsolidationConfig, sampler: Any,
             trainer: Trainer, teacher: Qwen3, state: TrainState) -> _Stepper:
  """The step function of a run; makes the sampler when none was given."""
  stop_ids = chat.stop_token_ids(tokenizer)
  pad_id = stop_ids[0] if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
  row_multiple = config.train.micro_batches
  if trainer.mesh is not None:
    row_multiple *= trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
  teacher_params = trainer.teacher_params(teacher)
  cached = None
  if config.teacher_prefix_cache:  # once per round: the teacher is frozen
    ids = teacher_prefix_ids(data.prefixes, data.knowledge, tokenizer, config)
    cached = trainer.knowledge_prefix(
        teacher_params, ids, pad_id=pad_id,
        length=bucket_size(max(len(x) for x in ids), config.min_length_bucket,
                           config.length_buckets_per_doubling))
  if sampler is None:
    # Built on the train state's arrays, so its weights sit where the trainer's do (on the
    # mesh); the policy's start replaces them by copies.
    sampler = Sampler(trainer.student(state), eos_ids=stop_ids, pad_id=pad_id,
                      max_seq_len=bucket_size(data.longest + 64) + config.max_new_tokens,
                      mesh=trainer.mesh)
  return _Stepper(inputs=data, tokenizer=tokenizer, config=config, sampler=sampler,
                  trainer=trainer, teacher_params=teacher_params, pad_id=pad_id,
                  row_multiple=row_multiple, policy=POLICIES[config.mode], teacher_prefix=cached)


def _run_steps(stepper: _Stepper, state: TrainState, history: list[dict[str, Any]], start: int,
               checkpoints: ckpt.Checkpoints | None, metrics_path: str | None, progress: bool,
               on_step: Callable[[int, dict[str, Any]], None] | None
               ) -> tuple[TrainState, list[dict[str, Any]]]:
  """Steps ``start + 1 .. config.steps``: each one's metrics line, checkpoint and callback."""
  config = stepper.config
  skipped_steps, consecutive = ckpt.skip_counts(history)
  bar = tqdm(total=config.steps, initial=start, unit="step", desc="consolidate",
             disable=not progress, leave=False)
  try:
    for step in range(start + 1, config.steps + 1):
      t_step = time.perf_counter()
      result = stepper(state, step)
      state, m = result.state, result.metrics
      if m["finite"]:
        consecutive = 0
      else:
        skipped_steps += 1
        consecutive += 1
        _log.warning(
            "consolidation step %d skipped: non-finite loss %s / grad norm %s; the train "
            "state is unchanged (%d skipped in a row, %d this round; the round stops at %d "
            "in a row)", step, m["loss"], m["grad_norm"], consecutive, skipped_steps,
            config.max_consecutive_skipped_steps)
      line = _step_line(result, step, skipped_steps, len(stepper.inputs.games), config, t_step)
      history.append(line)
      if metrics_path is not None:
        ckpt.append_metrics(metrics_path, line)
      if consecutive >= config.max_consecutive_skipped_steps:
        # Before the checkpoint: running again resumes before these steps and meets them
        # again, unless the limit was raised.
        raise NonFiniteLossError(ckpt.too_many_skipped(step, consecutive, m, config), state)
      if checkpoints is not None and (step == config.steps or (
          config.checkpoint_every and step % config.checkpoint_every == 0)):
        checkpoints.save(step, state, {
            "kind": ckpt.META_KIND, "version": ckpt.META_VERSION, "step": step,
            "games_consumed": step * config.games_per_step, "seed": config.seed,
            "fingerprint": stepper.inputs.fingerprint, "metrics": history})
      bar.update(1)
      bar.set_postfix(loss="skipped" if not m["finite"] else f"{m['loss']:.4g}",
                      tok_s=f"{m['tokens_per_second']:.0f}")
      if on_step is not None:
        on_step(step, dict(line))
  finally:
    bar.close()
  return state, history
