"""The run's plot: pass rate, response length and IF-Eval by OEL round (paper Figs. 4 and 5).

`plot_rounds(markers, "plots/rounds.png")` draws, from the loop's stage markers:

- pass rate on the held-out maps (mean over sampling seeds, error bars: their standard
  deviation) of the initial model (x = 0) and of the model after each round (x = r + 1);
- in light colour, when the run evaluated in context: the pass rate of round r's deployed
  model with the knowledge accumulated after s of n trajectories in its prompt, at
  x = r + s / n (the paper's transparent accumulation curves);
- mean response length per turn, the same way;
- IF-Eval prompt-level strict accuracy by round, when the run evaluated it.

A run without held-out games (``config.evaluation.games`` off) draws IF-Eval alone; a run
that evaluates nothing draws no plot.

Matplotlib is imported lazily with the Agg backend (no display needed); without matplotlib
the plot is skipped with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from oel_jax.atomic_write import atomic_open
from oel_jax.metrics import x_of


def _series(markers: Sequence[Mapping[str, Any]]):
  evals, in_context, ifeval = [], [], []
  for m in markers:
    if m["stage"] != "evaluate":
      continue
    x = x_of(m["round"])
    p = m["metrics"].get("pass_rate")  # None: no held-out games (config.evaluation.games)
    if p is not None:
      evals.append((x, p["pass_rate_mean"], p["pass_rate_std"], p["mean_response_tokens"]))
    if "ifeval" in m["metrics"]:
      ifeval.append((x, m["metrics"]["ifeval"]["prompt_level_strict"]))
    curve = [(x - 1 + ic["step"] / ic["num_trajectories"], ic["pass_rate_mean"],
              ic["mean_response_tokens"]) for ic in m["metrics"].get("in_context", [])]
    if curve:
      in_context.append((x - 1, curve))
  return sorted(evals), in_context, sorted(ifeval)


def plot_rounds(markers: Sequence[Mapping[str, Any]], path: str, *, title: str = "") -> bool:
  """Writes the PNG; returns False (and logs why) when there is nothing to plot or no
  matplotlib."""
  evals, in_context, ifeval = _series(markers)
  if not evals and not ifeval:
    return False
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.warning("no matplotlib: skipping the plot %s (pip install matplotlib)", path)
    return False

  panels = (2 if evals else 0) + (1 if ifeval else 0)
  fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
  axes = list(axes[0])
  if evals:
    _plot_games(axes[:2], evals, in_context)
  if ifeval:
    ax = axes[-1]
    ax.plot([i[0] for i in ifeval], [i[1] for i in ifeval], "o-", color="tab:green")
    ax.set_ylabel("IF-Eval prompt-level strict")
    ax.set_ylim(-0.02, 1.02)
  xs = [e[0] for e in evals] + [i[0] for i in ifeval]
  for ax in axes:
    ax.set_xlabel("OEL round (0 = initial model)")
    ax.set_xticks(range(0, max(xs) + 1))
    ax.grid(alpha=0.3)
  if in_context and evals:
    axes[0].legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  try:
    # A file object has no extension to take the format from: PNG whatever ``path`` is named.
    with atomic_open(path, "wb") as f:
      fig.savefig(f, format="png", dpi=110)
  finally:
    plt.close(fig)
  return True


def _plot_games(axes, evals, in_context) -> None:
  """The pass-rate and response-length panels."""
  xs = [e[0] for e in evals]
  color = "tab:blue"
  for start, curve in in_context:
    # The accumulation curve starts from the deployed model without knowledge (x = start).
    base = next((e for e in evals if e[0] == start), None)
    cx = ([start] if base else []) + [c[0] for c in curve]
    cp = ([base[1]] if base else []) + [c[1] for c in curve]
    cl = ([base[3]] if base else []) + [c[2] for c in curve]
    label = "in context (accumulating)" if start == in_context[0][0] else None
    axes[0].plot(cx, cp, "o--", color=color, alpha=0.35, label=label, markersize=3)
    axes[1].plot(cx, cl, "o--", color="tab:orange", alpha=0.35, label=label, markersize=3)
  axes[0].errorbar(xs, [e[1] for e in evals], yerr=[e[2] for e in evals], fmt="o-",
                   color=color, capsize=3, label="consolidated (held-out maps)")
  axes[0].set_ylabel("pass rate")
  axes[0].set_ylim(-0.02, 1.02)
  axes[1].plot(xs, [e[3] for e in evals], "o-", color="tab:orange", label="consolidated")
  axes[1].set_ylabel("mean response tokens per turn")
