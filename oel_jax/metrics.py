"""Metrics of the online loop: per-stage statistics, metrics.jsonl, TensorBoard, the summary.

Each stage of `oel_jax.loop` ends by writing a marker file holding its metrics. From the
markers, this module derives

- ``metrics.jsonl``: flat records, one JSON object a line, each with ``round``, ``stage`` and
  the stage's numbers (see `records`); rebuilt whole (atomically) after every stage, so a
  resumed run never holds a record twice;
- ``summary.json``: per round the held-out pass rate, response length and IF-Eval score, and
  the path of every round's model;
- TensorBoard event files (tensorboardX), written as each stage completes.

Keys whose values depend on wall-clock time are listed in `TIMING_KEYS`;
`deterministic` drops them, which is what two runs with the same seeds must agree on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from oel_jax.atomic_write import atomic_open

TIMING_KEYS = frozenset({
    "seconds", "completed", "tokens_per_s", "tokens_per_second", "step_time", "generate_s",
    "other_s", "wall_s", "timings", "sampling_time", "train_time", "sampled_tokens_per_second",
})
"""Record keys that measure time (they differ between otherwise identical runs)."""


def _num(value: Any) -> Any:
  """JSON-safe scalar (NumPy/JAX scalars to Python)."""
  if hasattr(value, "item") and getattr(value, "shape", None) == ():
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _mean(values: Sequence[float]) -> float:
  return math.fsum(values) / len(values) if values else 0.0


def game_stats(trajectories: Sequence[Any]) -> dict[str, Any]:
  """Games, pass rate, turns and generated tokens of a list of rollout trajectories."""
  turns = [turn for t in trajectories for turn in t.turns]
  tokens = [int(turn.metadata.get("response_tokens", 0)) for turn in turns]
  judged = [t for t in trajectories if t.outcome is not None]
  return {
      "games": len(trajectories),
      "pass_rate": _mean([float(t.outcome.success) for t in judged]),
      "mean_turns": _mean([len(t.turns) for t in trajectories]),
      "mean_response_tokens": _mean(tokens),
      "response_tokens": int(sum(tokens)),
      "truncated_fraction": _mean([float(turn.metadata.get("finish_reason") == "length")
                                   for turn in turns]),
  }


def extraction_stats(state: Any) -> dict[str, Any]:
  """Per accumulation step: knowledge tokens and items (mean over runs), empty extractions,
  replies whose reasoning never closed."""
  steps = []
  for record in state.history:
    runs = record["runs"]
    steps.append({
        "step": int(record["step"]) + 1,
        "mean_knowledge_tokens": _mean([r["knowledge_tokens"] for r in runs]),
        "mean_knowledge_items": _mean([r["knowledge_items"] for r in runs]),
        "new_items": int(sum(r["items"] for r in runs)),
        "empty": int(sum(bool(r["empty"]) for r in runs)),
        "unterminated_reasoning": int(sum(bool(r.get("unterminated_reasoning"))
                                          for r in runs)),
        "dropped_items": int(sum(r["dropped_items"] for r in runs)),
    })
  final = steps[-1] if steps else {}
  return {"runs": len(state.knowledge), "steps": steps,
          "knowledge_tokens": [int(_knowledge_tokens(state, k))
                               for k in range(len(state.knowledge))],
          "mean_knowledge_tokens": final.get("mean_knowledge_tokens", 0.0),
          "empty_extractions": int(sum(s["empty"] for s in steps)),
          # Replies cut inside their reasoning (kept as raw text, as officially).
          "unterminated_replies": int(sum(s["unterminated_reasoning"] for s in steps))}


def _knowledge_tokens(state: Any, run: int) -> int:
  if not state.history:
    return 0
  return state.history[-1]["runs"][run]["knowledge_tokens"]


def consolidation_stats(result: Any) -> dict[str, Any]:
  """The consolidation result's per-step metrics as a list of flat records, and a summary.

  The summary: first, final and mean loss (over the steps not skipped), and
  ``skipped_steps``, the steps skipped for a non-finite loss or gradient.
  """
  raw = getattr(result, "metrics", None)
  if raw is None:
    raw = getattr(result, "history", [])
  if isinstance(raw, Mapping):  # {name: [per step]} -> [{name: value}]
    names = list(raw)
    length = max((len(v) for v in raw.values()), default=0)
    raw = [{n: raw[n][i] for n in names if i < len(raw[n])} for i in range(length)]
  steps = []
  for i, m in enumerate(raw):
    m = dict(m) if isinstance(m, Mapping) else dict(vars(m))
    record = {k: _num(v) for k, v in m.items() if isinstance(_num(v), (int, float, str, bool))
              or _num(v) is None}
    record.setdefault("step", i + 1)
    steps.append(record)
  losses = [s["loss"] for s in steps if isinstance(s.get("loss"), (int, float))
            and not s.get("skipped")]
  return {"steps": steps, "first_loss": losses[0] if losses else None,
          "final_loss": losses[-1] if losses else None,
          "mean_loss": _mean(losses) if losses else None,
          "skipped_steps": sum(bool(s.get("skipped")) for s in steps)}


def brief(stage: str, metrics: Mapping[str, Any]) -> str:
  """One log line's worth of a stage's metrics."""
  try:
    if stage == "collect":
      a = metrics["all"]
      return (f"{a['games']} games, pass rate {a['pass_rate']:.3f}, "
              f"{a['mean_response_tokens']:.1f} tokens/turn, "
              f"{metrics.get('tokens_per_s', 0):.0f} tokens/s")
    if stage == "extract":
      return (f"{metrics['runs']} knowledge texts, {metrics['mean_knowledge_tokens']:.0f} "
              f"tokens each on average, {metrics['empty_extractions']} empty extractions, "
              f"{metrics.get('unterminated_replies', 0)} replies cut inside their reasoning")
    if stage == "consolidate":
      return (f"{len(metrics['steps'])} steps, loss {metrics['first_loss']} -> "
              f"{metrics['final_loss']}")
    if stage == "evaluate":
      p = metrics.get("pass_rate")
      parts = [] if p is None else [f"pass rate {p['pass_rate_mean']:.3f} +- "
                                    f"{p['pass_rate_std']:.3f}, "
                                    f"{p['mean_response_tokens']:.1f} tokens/turn"]
      if "ifeval" in metrics:
        parts.append(f"IF-Eval prompt-level strict "
                     f"{metrics['ifeval']['prompt_level_strict']:.3f}")
      text = ", ".join(parts) or "nothing to evaluate (config.evaluation.games and " \
          "config.ifeval.enabled are off)"
      if metrics.get("in_context"):
        text += f", in context {metrics['in_context'][-1]['pass_rate_mean']:.3f}"
      return text
    if stage == "export":
      return f"{metrics['dtype']}, {metrics['bytes'] / 2**20:.1f} MiB"
  except (KeyError, TypeError):
    pass
  return json.dumps(metrics)[:200]


def x_of(round_: Any) -> int:
  """Position on the "rounds" axis: 0 for the initial model, r + 1 after round r."""
  return 0 if round_ == "initial" else int(round_) + 1


def records(markers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The flat metric records of every completed stage, in run order."""
  out: list[dict[str, Any]] = []
  for m in markers:
    stage, r, metrics = m["stage"], m["round"], m["metrics"]
    base = {"round": r, "stage": stage}
    if stage == "collect":
      for split in ("extraction", "consolidation"):
        out.append({**base, "split": split, **metrics[split],
                    "tokens_per_s": metrics.get("tokens_per_s"), "seconds": m["seconds"]})
    elif stage == "extract":
      for s in metrics["steps"]:
        out.append({**base, **s})
      out.append({**base, "summary": True, "runs": metrics["runs"],
                  "mean_knowledge_tokens": metrics["mean_knowledge_tokens"],
                  "empty_extractions": metrics["empty_extractions"],
                  "unterminated_replies": metrics.get("unterminated_replies", 0),
                  "seconds": m["seconds"]})
    elif stage == "consolidate":
      for s in metrics["steps"]:
        rec = {**base, **s}
        if "loss" in rec and "kl" not in rec:
          rec["kl"] = rec["loss"]
        out.append(rec)
      out.append({**base, "summary": True, "final_loss": metrics["final_loss"],
                  "mean_loss": metrics["mean_loss"],
                  "skipped_steps": metrics.get("skipped_steps", 0), "seconds": m["seconds"]})
    elif stage == "evaluate":
      # Only what was evaluated: the held-out games, IF-Eval, either, or nothing (no record).
      p = metrics.get("pass_rate")
      rec = {**base, "x": x_of(r)}
      if p is not None:
        rec.update({"pass_rate": p["pass_rate_mean"], "pass_rate_std": p["pass_rate_std"],
                    "pass_rates": p["pass_rates"],
                    "mean_response_tokens": p["mean_response_tokens"],
                    "mean_turns": p["mean_turns"], "truncated_fraction": p["truncated_fraction"]})
      if "ifeval" in metrics:
        rec.update({f"ifeval_{k}": v for k, v in metrics["ifeval"].items()})
      if p is not None or "ifeval" in metrics:
        out.append({**rec, "seconds": m["seconds"]})
      for ic in metrics.get("in_context", []):
        out.append({**base, "in_context": True, "step": ic["step"],
                    "num_trajectories": ic["num_trajectories"],
                    "pass_rate": ic["pass_rate_mean"], "pass_rate_std": ic["pass_rate_std"],
                    "mean_response_tokens": ic["mean_response_tokens"]})
    else:
      out.append({**base, **metrics, "seconds": m["seconds"]})
  return out


def deterministic(record: Mapping[str, Any]) -> dict[str, Any]:
  """The record without its wall-clock fields (`TIMING_KEYS`)."""
  return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def write_jsonl(path: str, markers: Sequence[Mapping[str, Any]]) -> None:
  """Writes `records` of the markers to ``path`` (atomically)."""
  with atomic_open(path, "w") as f:
    for rec in records(markers):
      f.write(json.dumps(rec, ensure_ascii=False, allow_nan=True) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads ``metrics.jsonl``."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def summary(markers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per evaluated model: pass rate, response length, IF-Eval; every round's model path."""
  evals, models = [], {}
  for m in markers:
    if m["stage"] == "evaluate":
      p = m["metrics"].get("pass_rate")
      entry = {"round": m["round"], "x": x_of(m["round"])}
      if p is not None:
        entry.update({"pass_rate": p["pass_rate_mean"], "pass_rate_std": p["pass_rate_std"],
                      "mean_response_tokens": p["mean_response_tokens"]})
      if "ifeval" in m["metrics"]:
        entry["ifeval_prompt_level_strict"] = m["metrics"]["ifeval"]["prompt_level_strict"]
      if m["metrics"].get("in_context"):
        entry["in_context_pass_rate"] = m["metrics"]["in_context"][-1]["pass_rate_mean"]
      if len(entry) > 2:  # Something was evaluated (config.evaluation.games, IF-Eval).
        evals.append(entry)
    if m["stage"] == "export":
      models[str(m["round"])] = m["artifacts"]["export"]
  done_rounds = sorted(int(r) for r in models)
  return {"evaluations": evals, "models": models,
          "final_model": models[str(done_rounds[-1])] if done_rounds else None}


class TensorBoard:
  """Writes stage metrics as TensorBoard scalars (tensorboardX), if it is installed.

  Steps: collection, extraction and evaluation use the rounds axis (`x_of`: 0 = the
  initial model, r + 1 = after round r; collection of round r at r); consolidation steps
  count across rounds (``round * steps_per_round + step``).
  """

  def __init__(self, logdir: str):
    self.logdir = logdir
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError:
      logging.warning("TensorBoard event files need tensorboardX (pip install tensorboardX); "
                      "metrics.jsonl holds every number")
      self._writer = None
    else:
      self._writer = SummaryWriter(logdir=logdir)

  def _scalar(self, tag: str, value: Any, step: int) -> None:
    value = _num(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      self._writer.add_scalar(tag, float(value), int(step))

  def write(self, marker: Mapping[str, Any], *, steps_per_round: int) -> None:
    """Logs one completed stage."""
    if self._writer is None:
      return
    for rec in records([marker]):
      stage, r = rec["stage"], rec["round"]
      if stage == "collect":
        for key in ("pass_rate", "mean_response_tokens", "tokens_per_s"):
          self._scalar(f"collect_{rec['split']}/{key}", rec.get(key), int(r))
      elif stage == "extract" and not rec.get("summary"):
        step = int(r) * 10_000 + rec["step"]
        for key in ("mean_knowledge_tokens", "mean_knowledge_items", "empty",
                    "unterminated_reasoning"):
          self._scalar(f"extract/{key}", rec.get(key), step)
      elif stage == "consolidate" and not rec.get("summary"):
        step = int(r) * steps_per_round + int(rec.get("step", 0))
        for key, value in rec.items():
          if key not in ("round", "stage", "step"):
            self._scalar(f"consolidate/{key}", value, step)
      elif stage == "evaluate" and rec.get("in_context"):
        self._scalar("eval_in_context/pass_rate", rec["pass_rate"], x_of(r))
      elif stage == "evaluate":
        for key, value in rec.items():
          if key in ("pass_rate", "pass_rate_std", "mean_response_tokens", "mean_turns") or \
              key.startswith("ifeval_"):
            self._scalar(f"eval/{key}", value, rec["x"])
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
