"""The learning demo's measurements: OEL against its controls and baselines over several seeds.

Usage:
  python scripts/demo_experiments.py [--seeds 0 1 2] [--variants oel lr0 off_policy raw]
                                     [--out runs/demo_experiments] [--model DIR] [--rounds N]

Every run is the ordinary loop (`oel_jax.loop.OnlineLoop`) on ``configs/demo.py`` with one
change per variant, in the same world and with the same seeds:

- ``oel``: the demo as configured (on-policy top-k reverse KL, knowledge in the teacher).
- ``lr0``: the same with learning rate 0: every stage runs, the weights never move.
- ``off_policy``: the paper's off-policy context distillation baseline (the teacher's own
  samples, forward KL), as ``consolidation.mode="off_policy"``.
- ``raw``: the paper's raw-trajectory baseline: the teacher sees the extraction games'
  trajectories instead of extracted knowledge (``consolidation.context="raw_trajectories"``).

After each run, every evaluated model (initial and each round's) also plays the held-out boards
on two other lakes: the standard, unnamed lake (the paper's FrozenLake prompt, no holes and no
thin ice: the out-of-distribution check) and the mirror lake (unnamed, the top row thin: the
opposite of Ossa, where the first move Ossa teaches falls through).
Resumable (each loop resumes; finished measurements are read back). Writes ``results.json``
and ``demo_experiments.png`` into ``--out``.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import numpy as np  # pylint: disable=wrong-import-position

from oel_jax import config as config_lib  # pylint: disable=wrong-import-position
from oel_jax.demo import MIRROR_WORLD, STANDARD_WORLD  # pylint: disable=wrong-import-position
from oel_jax.envs import ModelInfo  # pylint: disable=wrong-import-position
from oel_jax.evaluate import evaluate  # pylint: disable=wrong-import-position
from oel_jax.loop import INITIAL, OnlineLoop  # pylint: disable=wrong-import-position

VARIANTS = {
    "oel": {},
    "lr0": {"train.learning_rate": 0.0, "evaluation.in_context": False},
    "off_policy": {"consolidation.mode": "off_policy", "train.divergence": "forward_kl"},
    "raw": {"consolidation.context": "raw_trajectories"},
}
LABELS = {"oel": "OEL (on-policy, knowledge)", "lr0": "OEL, learning rate 0",
          "off_policy": "off-policy context distillation", "raw": "raw trajectories in context"}


def demo_config():
  return config_lib.load_config_file(os.path.join(_REPO, "configs", "demo.py"))


def configure(variant: str, seed: int, model: str = "", rounds: int = 0):
  config = demo_config()
  config.seed = seed
  if model:
    config.model = model
  if rounds:
    config.rounds = rounds
  config.progress = False
  for key, value in VARIANTS[variant].items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def other_lake(loop: OnlineLoop, summary, world) -> list[dict]:
  """Pass rate of every evaluated model on ``world``'s lake (the held-out boards)."""
  config = dataclasses.replace(loop.plan.evaluation, env_settings=world.settings(),
                               progress=False)
  out = []
  for e in summary["evaluations"]:
    path = loop.deployed_path(0 if e["round"] == INITIAL else int(e["round"]) + 1)
    result = evaluate(loop.sampler(path), loop.tokenizer(), config, model=ModelInfo(path))
    out.append({"round": e["round"], "pass_rate": result.to_dict()["pass_rate_mean"]})
  return out


def run_one(variant: str, seed: int, out: str, model: str = "", rounds: int = 0) -> dict:
  record_file = os.path.join(out, f"{variant}_seed{seed}.json")
  if os.path.exists(record_file):
    with open(record_file) as f:
      return json.load(f)
  start = time.time()
  loop = OnlineLoop(configure(variant, seed, model, rounds),
                    os.path.join(out, f"{variant}_seed{seed}"))
  summary = loop.run()
  record = {"variant": variant, "seed": seed, "evaluations": summary["evaluations"],
            "seconds_loop": round(time.time() - start)}
  record["standard_lake"] = other_lake(loop, summary, STANDARD_WORLD)
  record["mirror_lake"] = other_lake(loop, summary, MIRROR_WORLD)
  record["seconds"] = round(time.time() - start)
  with open(record_file, "w") as f:
    json.dump(record, f, indent=2)
  return record


def table(records: list[dict]) -> dict:
  """Mean and spread over seeds of each variant's curves."""
  out = {}
  for variant in VARIANTS:
    runs = [r for r in records if r["variant"] == variant]
    if not runs:
      continue
    curves = {
        "pass_rate": [[e["pass_rate"] for e in r["evaluations"]] for r in runs],
        # The initial model has no in-context rate: NaN, which nanmean/nanmin skip.
        "in_context": [[e.get("in_context_pass_rate", np.nan) for e in r["evaluations"]]
                       for r in runs],
        "tokens_per_turn": [[e["mean_response_tokens"] for e in r["evaluations"]]
                            for r in runs],
        "standard_lake": [[e["pass_rate"] for e in r["standard_lake"]] for r in runs],
        "mirror_lake": [[e["pass_rate"] for e in r["mirror_lake"]] for r in runs],
    }
    with warnings.catch_warnings():  # all-NaN columns (no in-context rate) stay NaN quietly
      warnings.simplefilter("ignore", RuntimeWarning)
      stats = {k: {"mean": np.nanmean(v, 0).round(4).tolist(), "min": np.nanmin(v, 0).tolist(),
                   "max": np.nanmax(v, 0).tolist(), "per_seed": v} for k, v in curves.items()}
    out[variant] = {
        "seeds": [r["seed"] for r in runs],
        "rounds": [str(e["round"]) for e in runs[0]["evaluations"]],
        **stats,
        "rise": [round(c[-1] - c[0], 4) for c in curves["pass_rate"]],
        "seconds": [r["seconds"] for r in runs],
    }
  return out


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for variant, r in results.items():
    x = np.arange(len(r["rounds"]))
    mean, lo, hi = (np.array(r["pass_rate"][k]) for k in ("mean", "min", "max"))
    line, = axes[0].plot(x, mean, marker="o", label=LABELS[variant])
    axes[0].fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    if variant == "oel":
      axes[0].plot(x, r["in_context"]["mean"], ls="--", marker="x", color=line.get_color(),
                   label="in context (round-start model + knowledge)")
    axes[1].plot(x, r["standard_lake"]["mean"], marker="o", color=line.get_color(),
                 label=LABELS[variant])
    axes[1].plot(x, r["mirror_lake"]["mean"], marker="s", ls=":", color=line.get_color())
    axes[2].plot(x, r["tokens_per_turn"]["mean"], marker="o", color=line.get_color(),
                 label=LABELS[variant])
  names = ["initial"] + [f"round {i}" for i in range(len(next(iter(results.values()))["rounds"]) - 1)]
  for ax, title in zip(axes, ["held-out games on lake Ossa (no knowledge)",
                              "standard lake (solid), mirror lake (dotted)", "response tokens per turn"]):
    ax.set_xticks(range(len(names)), names)
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("pass rate (mean over seeds; band: min-max)")
  axes[0].set_ylim(-0.02, 1.02)
  axes[1].set_ylim(-0.02, 1.02)
  axes[2].set_ylim(0, 1.25 * max(max(r["tokens_per_turn"]["max"]) for r in results.values()))
  axes[0].legend(fontsize=8, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--out", default=os.path.join("runs", "demo_experiments"))
  parser.add_argument("--model", default="",
                      help="a model directory instead of the packaged demo model (e.g. a rebuild)")
  parser.add_argument("--rounds", type=int, default=0, help="rounds instead of the config's")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  records = []
  for variant in args.variants:
    for seed in args.seeds:
      records.append(run_one(variant, seed, args.out, args.model, args.rounds))
      r = records[-1]
      rates = " -> ".join(f"{e['pass_rate']:.3f}" for e in r["evaluations"])
      standard = " -> ".join(f"{e['pass_rate']:.3f}" for e in r["standard_lake"])
      mirror = " -> ".join(f"{e['pass_rate']:.3f}" for e in r["mirror_lake"])
      print(f"{variant} seed {seed}: pass rate {rates}; standard lake {standard}; mirror lake "
            f"{mirror} ({r['seconds']} s)", flush=True)
  results = table(records)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot(results, os.path.join(args.out, "demo_experiments.png"))
  print(f"wrote {os.path.join(args.out, 'results.json')} and "
        f"{os.path.join(args.out, 'demo_experiments.png')}")


if __name__ == "__main__":
  main()
