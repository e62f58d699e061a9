"""Command-line entry point: the online OEL loop, one of its stages, or a quick model probe.

    python -m oel_jax.main                                     # tiny default: two short rounds
    python -m oel_jax.main --config=configs/qwen3_4b_frozenlake.py \\
        --config.model=/ckpt/Qwen3-4B --workdir=runs/qwen3-4b
    python -m oel_jax.main --config=configs/tiny.py --workdir=runs/tiny \\
        --stage=extract --round=0                              # one stage of one round
    python -m oel_jax.main --stage=probe --prompt="Which way?"  # next-token candidates

``--config`` is an ml_collections config file (``configs/``; default ``configs/tiny.py``);
any field can be overridden with ``--config.<field>=<value>``. The config is validated
before anything is loaded: an invalid value stops the run with a message naming the field.

``--stage``: ``loop`` (default) runs every round, skipping stages already done in
``--workdir`` (so the same command resumes an interrupted run); ``collect``, ``extract``,
``consolidate``, ``evaluate`` or ``export`` runs that stage of ``--round`` (default: the first
round where it has not run; ``--round=initial`` evaluates the initial model); ``validate``
only checks the config; ``plot`` redraws ``plots/rounds.png`` and ``metrics.jsonl``;
``probe`` loads ``config.model``, renders ``--prompt`` with the chat template and prints the
most likely next tokens (a smoke test of a checkpoint).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_REPO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "tiny.py")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", _REPO_CONFIG if os.path.isfile(_REPO_CONFIG) else None,
    "ml_collections config file (configs/<name>.py); override fields with --config.x=y.",
    lock_config=True)
flags.DEFINE_string("workdir", "", "Run folder (default: runs/<config.name>). Re-running the "
                    "same command in the same workdir resumes.")
flags.DEFINE_enum("stage", "loop", ["loop", "collect", "extract", "consolidate", "evaluate",
                                    "export", "validate", "plot", "probe"],
                  "What to run (see the module docstring).")
flags.DEFINE_string("round", "", "Round of a single stage: an index, or 'initial' (evaluate "
                    "only); default: the first round where the stage has not run.")
flags.DEFINE_string("prompt", "You are on a frozen lake. Which way do you move: [up], "
                    "[down], [left] or [right]?", "probe: the user message to complete.")
flags.DEFINE_bool("thinking", True, "probe: render the chat template with enable_thinking.")
flags.DEFINE_integer("top", 5, "probe: how many next-token candidates to print.")


def next_token_candidates(model, tokenizer, messages, *, enable_thinking: bool, top: int
                          ) -> list[tuple[str, int, float]]:
  """The `top` most likely next tokens after the rendered chat: (text, id, probability)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from oel_jax import chat  # pylint: disable=import-outside-toplevel

  ids = chat.encode_chat(tokenizer, messages, enable_thinking=enable_thinking)
  logits = model(jnp.asarray([ids]))[0, -1]
  # Rows past the tokenizer's length are padding the tokenizer can never produce.
  probs = jax.nn.softmax(logits[: len(tokenizer)])
  best = jax.lax.top_k(probs, top)
  return [(tokenizer.decode([int(i)]), int(i), float(p)) for p, i in zip(*best)]


def probe(run) -> None:
  """Prints the model's most likely next tokens after ``--prompt`` (a checkpoint smoke test)."""
  from oel_jax import chat  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  model, tokenizer = run.load_model(run.config.model), run.tokenizer()
  messages = [{"role": "user", "content": FLAGS.prompt}]
  text = chat.render_chat(tokenizer, messages, enable_thinking=FLAGS.thinking)
  print(f"model: {run.config.model}")
  print(f"prompt ({len(tokenizer(text, add_special_tokens=False)['input_ids'])} tokens):")
  print(text)
  print("most likely next tokens:")
  for token, token_id, prob in next_token_candidates(
      model, tokenizer, messages, enable_thinking=FLAGS.thinking, top=FLAGS.top):
    print(f"  {prob:8.4f}  id {token_id:>6}  {token!r}")
  print(f"done in {time.perf_counter() - start:.1f}s")


def _pick_round(run, stage: str):
  from oel_jax import loop  # pylint: disable=import-outside-toplevel
  if FLAGS.round:
    return loop.INITIAL if FLAGS.round == loop.INITIAL else int(FLAGS.round)
  for r in range(int(run.config.rounds)):
    if not run.done(r, stage):
      return r
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from oel_jax import loop  # pylint: disable=import-outside-toplevel

  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required (no configs/tiny.py beside the package)")
  workdir = FLAGS.workdir or os.path.join("runs", str(config.get("name", "oel")))
  try:
    run = loop.OnlineLoop(config, workdir)
  except loop.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  stage = FLAGS.stage
  if stage == "validate":
    print(f"config OK: {config.name}, model {config.model}, {config.rounds} rounds, "
          f"mesh {run.plan.mesh_shape}")
    return
  if stage == "probe":
    probe(run)
    return
  try:
    run.check_workdir()
  except loop.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if stage == "plot":
    run._publish()  # pylint: disable=protected-access
    print(f"wrote {os.path.join(run.workdir, 'metrics.jsonl')} and "
          f"{os.path.join(run.workdir, 'plots', 'rounds.png')}")
    return
  start = time.perf_counter()
  if stage == "loop":
    summary = run.run()
    for e in summary["evaluations"]:
      line = (f"  {'initial' if e['round'] == 'initial' else 'round ' + str(e['round'])}: "
              f"pass rate {e['pass_rate']:.3f} +- {e['pass_rate_std']:.3f}, "
              f"{e['mean_response_tokens']:.1f} tokens/turn")
      if "ifeval_prompt_level_strict" in e:
        line += f", IF-Eval {e['ifeval_prompt_level_strict']:.3f}"
      print(line)
    print(f"final model: {summary['final_model'] and os.path.join(run.workdir, summary['final_model'])}")
  else:
    round_ = _pick_round(run, stage)
    if round_ is None:
      print(f"{stage}: done for every round in {run.workdir}")
      return
    run.run_stage(stage, round_)
    run._publish()  # pylint: disable=protected-access
  print(f"{stage} finished in {time.perf_counter() - start:.1f}s; workdir {run.workdir}")
  logging.flush()


if __name__ == "__main__":
  app.run(main)
