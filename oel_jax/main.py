"""Command-line entry point: the online OEL loop, one of its stages, or a quick model probe.

    python -m oel_jax.main                                     # the learning demo: one round
    python -m oel_jax.main --config=configs/qwen3_4b_frozenlake.py \\
        --config.model=/ckpt/Qwen3-4B --workdir=runs/qwen3-4b
    python -m oel_jax.main --config=configs/tiny.py --workdir=runs/tiny \\
        --stage=extract --round=0                              # one stage of one round
    python -m oel_jax.main --stage=probe --prompt="Which way?"  # next-token candidates

``--config`` is an ml_collections config file (``configs/``; default: the learning demo's,
``oel_jax/demo/config.py``, which ``configs/demo.py`` re-exports);
any field can be overridden with ``--config.<field>=<value>``. The config is validated
before anything is loaded: an invalid value stops the run with a message naming the field.

``--stage``: ``loop`` (default) runs every round, skipping stages already done in
``--workdir`` (so the same command resumes an interrupted run); ``collect``, ``extract``,
``consolidate``, ``evaluate`` or ``export`` runs that stage of ``--round`` (default: the first
round where it has not run; ``--round=initial`` evaluates the initial model); ``validate``
only checks the config; ``plot`` redraws ``plots/rounds.png`` and ``metrics.jsonl``;
``probe`` loads ``config.model``, renders ``--prompt`` with the chat template and prints the
most likely next tokens (a smoke test of a checkpoint).

Several hosts (a TPU pod slice, GPU nodes): every process runs the same command, with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or none of them on a
cluster JAX detects by itself: TPU pod slices, SLURM), and a ``--workdir`` every host sees.
The processes first check that they were started alike (the resolved config, the command's
stage, round and workdir, the oel_jax code and the JAX version) and stop, naming what
differs, when not; then they run the stages together, process 0 writing every file
(`oel_jax.distributed`). When one process dies (or gives no sign of life for
``--peer_timeout`` seconds) or stops on an error, the others stop too, with one line naming
it and exit code 1; the same command, run again on every host, resumes.

Bad input (an unknown ``--config.<field>``, an invalid value, a truncated checkpoint, a
malformed trajectory or knowledge file) ends with one line, ``error: <what, where>``, and exit
code 2; ``--debug`` shows the Python traceback instead.
"""

from __future__ import annotations

import difflib
import json
import logging as py_logging
import os
import re
import sys
import time
import traceback
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from oel_jax import chat, distributed, loop, parallel
from oel_jax import config as config_lib
from oel_jax.errors import InputError, one_line
from oel_jax.train import NonFiniteLossError

# The package's copy, so that a pip-installed oel_jax runs its default too.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "config.py")

FLAGS = flags.FLAGS
# No default here: ml_collections would parse the command line's overrides while this module is
# imported, before any error could be reported cleanly; `parse_flags` supplies the default.
config_flags.DEFINE_config_file(
    "config", None,
    "ml_collections config file (configs/<name>.py; default: the learning demo); override "
    "fields with --config.x=y.", lock_config=True)
flags.DEFINE_bool("debug", False, "On bad input, show the Python traceback instead of one "
                  "'error:' line.")
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
flags.DEFINE_string("coordinator_address", None, "Several processes: HOST:PORT of process "
                    "0's coordinator (with --num_processes and --process_id; none of the "
                    "three on a cluster JAX detects, e.g. a TPU pod slice or SLURM).")
flags.DEFINE_integer("num_processes", None, "Several processes: how many.")
flags.DEFINE_integer("process_id", None, "Several processes: this one's index, from 0.")
flags.DEFINE_float("peer_timeout", distributed.DEFAULT_PEER_TIMEOUT_S, "Several processes: "
                   "seconds another process may give no sign of life (it died, or hangs) "
                   "before this one stops too, naming it.")


def next_token_candidates(model, tokenizer, messages, *, enable_thinking: bool, top: int
                          ) -> list[tuple[str, int, float]]:
  """The `top` most likely next tokens after the rendered chat: (text, id, probability)."""
  ids = chat.encode_chat(tokenizer, messages, enable_thinking=enable_thinking)
  # Whole on every process, whichever devices hold the vocabulary's shards.
  logits = jnp.asarray(parallel.to_host(model(jnp.asarray([ids]))[0, -1]))
  # Rows past the tokenizer's length are padding the tokenizer can never produce.
  probs = jax.nn.softmax(logits[: len(tokenizer)])
  best = jax.lax.top_k(probs, top)
  return [(tokenizer.decode([int(i)]), int(i), float(p)) for p, i in zip(*best)]


def probe(run) -> None:
  """Prints the model's most likely next tokens after ``--prompt`` (a checkpoint smoke test)."""
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


def _fail(message: str, code: int = 2) -> None:
  # In a job of several processes, the others stop too, naming this one.
  distributed.stop(message, code)


def _config_paths(config: Mapping, prefix: str = "") -> list[str]:
  """Every field of a (nested) config as a dotted path, sections included."""
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      paths.extend(_config_paths(value, f"{prefix}{key}."))
  return paths


def nearest_fields(field: str, paths: list[str], n: int = 4) -> list[str]:
  """The config fields most like ``field``: by leaf name first (the same section's first),
  else by the whole dotted path."""
  parent, _, leaf = field.rpartition(".")
  leaves = difflib.get_close_matches(leaf, {p.rpartition(".")[2] for p in paths}, n=n,
                                     cutoff=0.7)
  same_leaf = [p for p in paths if p.rpartition(".")[2] in leaves]
  if same_leaf:
    score = lambda p: (p.rpartition(".")[0] != parent,
                       -difflib.SequenceMatcher(None, field, p).ratio())
    return sorted(same_leaf, key=score)[:n]
  return difflib.get_close_matches(field, paths, n=n, cutoff=0.0)


# Fields that moved: their new places are named first.
MOVED_FIELDS = {f"rollout.{k}": [f"collect.extraction_sampling.{k}",
                                 f"collect.consolidation_sampling.{k}"]
                for k in ("temperature", "top_k", "top_p")}


def check_overrides(argv: list[str], config_file: str) -> None:
  """Loads the config file; raises InputError naming the first ``--config.<field>`` it does
  not have, with the nearest fields it does have."""
  config = config_lib.load_config_file(config_file)
  paths = _config_paths(config)
  known = set(paths)
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if match and match.group(1) not in known:
      field = match.group(1)
      nearest = MOVED_FIELDS.get(field, []) + nearest_fields(field, paths)
      nearest = [p for i, p in enumerate(nearest) if p in known and p not in nearest[:i]][:4]
      raise InputError(f"--config.{field}: {config_file} has no field {field!r}; nearest: "
                       + ", ".join(f"--config.{p}" for p in nearest))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with the default config file and clean errors for bad overrides."""
  debug = "--debug" in argv or "-debug" in argv
  try:
    if not any(re.match(r"^--?config(=|$)", a) for a in argv[1:]):
      argv = [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]
    spec = next(a.split("=", 1)[1] if "=" in a else argv[i + 2]
                for i, a in enumerate(argv[1:]) if re.match(r"^--?config(=|$)", a))
    check_overrides(argv[1:], spec)  # also reports a missing config file
    return FLAGS(argv)
  except IndexError:  # "--config" last, with no file after it
    if debug:
      raise
    _fail("--config needs a config file")
  except (InputError, flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    if debug:
      raise
    _fail(one_line(e))
  return []  # not reached


def quiet_startup() -> None:
  """Drops start-up notes that read like failures on a plain CPU machine: JAX's INFO line
  about the TPU backend it did not find, and transformers' advisory that PyTorch is absent
  (we use only its tokenizers)."""
  py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _pick_round(run, stage: str):
  if FLAGS.round:
    return loop.INITIAL if FLAGS.round == loop.INITIAL else int(FLAGS.round)
  for r in range(int(run.config.rounds)):
    if not run.done(r, stage):
      return r
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    # oel_jax's own progress lines at INFO; other libraries' (orbax logs every checkpoint
    # step) only from WARNING up. --verbosity=0 shows everything.
    logging.set_verbosity(logging.WARNING)
    py_logging.getLogger("oel_jax").setLevel(py_logging.INFO)
  try:
    # Before anything touches a device: joining a job must come first.
    process = distributed.start(FLAGS.coordinator_address, FLAGS.num_processes,
                                FLAGS.process_id, peer_timeout_s=FLAGS.peer_timeout)
  except ValueError as e:
    if FLAGS.debug:
      raise
    _fail(one_line(e))
  if process.count > 1:
    logging.info("process %d of %d, %d of the job's %d devices", process.index, process.count,
                 process.local_devices, process.devices)
  try:
    _main()
  except InputError as e:
    if FLAGS.debug:
      raise
    _fail(one_line(e))
  except NonFiniteLossError as e:  # a round stopped on its own limit: no bug to trace
    if FLAGS.debug:
      raise
    _fail(one_line(e), code=1)
  except distributed.DisagreementError as e:
    if FLAGS.debug:
      raise
    _fail(one_line(e))
  except Exception as e:  # pylint: disable=broad-except
    if process.count == 1:
      raise
    # A bug, or a collective that failed because another process died: the traceback for
    # the first, and one line, naming the dead process when the watchdog finds it, for both.
    traceback.print_exc()
    distributed.stop(f"process {process.index} of {process.count}: {type(e).__name__}: "
                     f"{one_line(e)}", 1, peer_may_be_the_cause=True)
  distributed.finish()


def _flat(tree: Mapping, prefix: str = "") -> dict[str, object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def start_alike(config, workdir: str) -> loop.OnlineLoop:
  """The run, once every process has checked that all were started alike (one process:
  just the run).

  The processes compare the resolved config (as the workdir records it, field by field), the
  command (stage, round, workdir), the code and the JAX version, and the outcome of checking
  the config on their own machine (a checkpoint missing on one host fails there only): all
  stop with the same error, rather than some going on to wait for the others forever. Then
  they check that they hold the same files for every model the config names.

  Raises:
    DisagreementError: naming what differs (`oel_jax.hub.DifferentFilesError`: the files).
    ConfigError: the config is invalid (on every process).
  """
  try:
    run, problem = loop.OnlineLoop(config, workdir), ""
  except config_lib.ConfigError as e:
    run, problem = None, str(e)
  if jax.process_count() > 1:
    recorded = config_lib.parse(config)[0].to_dict()  # the config as config.json records it
    try:
      distributed.check_agreement({
          **{f"config.{k}": json.dumps(v) for k, v in _flat(recorded).items()},
          "--stage": FLAGS.stage, "--round": FLAGS.round, "--workdir": workdir,
          "code": distributed.code_version(),
          "jax": jax.__version__,
          "config check": problem,
      })
    except distributed.DisagreementError as e:
      if problem:  # the digests alone would not say what this process found
        raise distributed.DisagreementError(f"{e} This process's config check: {problem}") \
            from None
      raise
  if run is None:
    raise config_lib.ConfigError(problem)
  # Each host may have resolved a hub id into its own cache: the same files before any stage.
  run.pool.check_files()
  return run


def _main():
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join("runs", str(config.get("name", "oel")))
  run = start_alike(config, workdir)
  stage = FLAGS.stage
  if stage == "validate":
    print(f"config OK: {config.name}, model {config.model}, {config.rounds} rounds, "
          f"mesh {run.plan.mesh_shape}")
    return
  if stage == "probe":
    probe(run)
    return
  run.check_workdir()
  if stage == "plot":
    run.publish()
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
      if "in_context_pass_rate" in e:
        line += f" (in context, round start: {e['in_context_pass_rate']:.3f})"
      if "ifeval_prompt_level_strict" in e:
        line += f", IF-Eval {e['ifeval_prompt_level_strict']:.3f}"
      print(line)
    if run.config.logging.plot:
      print(f"plot: {os.path.join(run.workdir, 'plots', 'rounds.png')}")
    print(f"final model: {summary['final_model'] and os.path.join(run.workdir, summary['final_model'])}")
  else:
    round_ = _pick_round(run, stage)
    if round_ is None:
      print(f"{stage}: done for every round in {run.workdir}")
      return
    run.run_stage(stage, round_)
    run.publish()
  print(f"{stage} finished in {time.perf_counter() - start:.1f}s; workdir {run.workdir}")
  logging.flush()


if __name__ == "__main__":
  quiet_startup()
  app.run(main, flags_parser=parse_flags)
