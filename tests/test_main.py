"""The CLI on the tiny plumbing config (its stages, errors, resume) and CI's commands.

The README's main job itself (the learning demo) is tested in tests/test_demo.py."""

import os
import re

import pytest

import tiny_loop_run
from oel_jax import config as config_lib
from oel_jax import metrics
from tiny_loop_run import ROOT, main_env, run_main


def _readme_commands() -> list[str]:
  readme = open(os.path.join(ROOT, "README.md")).read()
  return re.findall(r"```bash\n(.+?)\n```", readme)


@pytest.fixture(scope="module", name="tiny_run")
def fixture_tiny_run(tmp_path_factory):
  return tiny_loop_run.uninterrupted(tmp_path_factory)


def test_ci_runs_exactly_the_readme_commands():
  main_command, test_command = _readme_commands()[:2]
  assert "pytest" in test_command and "pip install -e ." in main_command
  ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
  assert test_command in ci
  # The main job, verbatim, in its own base-install environment, its output kept for checks.
  assert any(line.startswith(main_command + " 2>&1 | tee ") for line in ci)
  assert ci.index(test_command) > [i for i, l in enumerate(ci) if l.startswith(main_command)][0]


def test_the_base_install_declares_what_oel_jax_imports():
  """Every third-party module that oel_jax imports, and jinja2 (transformers needs it for chat
  templates but does not depend on it), is a base dependency: not one the test extra brings.
  The one exception is `oel_jax.serve`, whose web stack is the ``serve`` extra (imported only
  there, and declared there)."""
  import ast  # pylint: disable=import-outside-toplevel
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import tomllib  # pylint: disable=import-outside-toplevel
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  def names(requirements):
    return {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-")
            for d in requirements}

  declared = names(project["dependencies"])
  serve_extra = names(project["optional-dependencies"]["serve"])
  serve_folder = os.path.join(ROOT, "oel_jax", "serve")
  serve_modules = set()
  optional = {"datasets"}  # google/IFEval from the hub: optional, with a clear ImportError
  modules = set()
  for folder, _, files in os.walk(os.path.join(ROOT, "oel_jax")):
    for name in files:
      if name.endswith(".py"):
        tree = ast.parse(open(os.path.join(folder, name)).read())
        imported = set()
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
          elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        in_serve = os.path.commonpath([folder, serve_folder]) == serve_folder
        (serve_modules if in_serve else modules).update(imported)
  third_party = {m for m in modules - set(sys.stdlib_module_names) - {"oel_jax"} - optional}
  distributions = importlib.metadata.packages_distributions()
  needed = {"jinja2"}
  for module in third_party:
    assert module in distributions, f"oel_jax imports {module!r}, which is not installed"
    needed.update(d.lower().replace("_", "-") for d in distributions[module])
  assert needed <= declared, f"imported but not declared: {sorted(needed - declared)}"
  serving = set()
  for module in serve_modules - modules - set(sys.stdlib_module_names) - {"oel_jax"}:
    assert module in distributions, f"oel_jax.serve imports {module!r}, which is not installed"
    serving.update(d.lower().replace("_", "-") for d in distributions[module])
  missing = serving - declared - serve_extra
  assert not missing, f"oel_jax.serve imports, declared in no extra: {sorted(missing)}"


def test_tiny_plumbing_run_finishes_two_rounds_in_a_few_minutes(tiny_run):
  out = tiny_run.process
  assert out.returncode == 0, out.stderr[-3000:]
  # A newcomer's screen: our stage lines, no start-up notes that read like failures and no
  # INFO chatter of the libraries (orbax logs every checkpoint step).
  assert "round 0: collect done in" in out.stderr
  for noise in ("Unable to initialize backend", "checkpoint_manager.py", "font_manager.py"):
    assert noise not in out.stderr, noise
  assert re.search(r"^  round 1: pass rate \d\.\d{3}", out.stdout, re.M), out.stdout
  assert "final model: " + os.path.join(tiny_run.workdir, "round_001", "model") in out.stdout
  assert tiny_run.seconds < 480, f"main job took {tiny_run.seconds:.0f}s"


def test_running_the_finished_command_again_does_nothing_new(tiny_run):
  marker = os.path.join(tiny_run.workdir, "round_001", "consolidate.done.json")
  before = os.path.getmtime(marker)
  out = run_main(f"--workdir={tiny_run.workdir}", "--stage=export", timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "export: done for every round" in out.stdout
  assert os.path.getmtime(marker) == before


def test_probe_prints_next_token_candidates():
  out = run_main("--stage=probe", "--top=3", timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "<|im_start|>assistant\n" in out.stdout
  candidates = re.findall(r"^\s+(\d\.\d+)\s+id\s+(\d+)", out.stdout, re.M)
  assert len(candidates) == 3
  probs = [float(p) for p, _ in candidates]
  assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1


def test_bad_config_values_fail_before_any_work(tmp_path):
  workdir = tmp_path / "never"
  env = dict(main_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = run_main(f"--workdir={workdir}", "--config.train.k=5000", "--config.env=chess",
                 "--config.mesh.tp=3", env=env, timeout=300)
  assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
  err = out.stderr
  assert "config.train.k (5000) exceeds the model's vocabulary (2048 rows)" in err
  assert "config.env must be one of ('frozenlake', 'sokoban'), got 'chess'" in err
  # A tensor-parallel axis of 3 cannot be laid over the 4 devices.
  assert ("config.mesh: {'data': 1, 'fsdp': -1, 'tp': 3}: 4 devices do not divide by the "
          "fixed axes (product 3)") in err
  assert not workdir.exists()


def _load_config(name: str):
  return config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))


PAPER = {  # Table 4: format, n, L_max, learning rate, steps; K = 10 throughout.
    "qwen3_1p7b_frozenlake": ("frozenlake", "unstructured", 15, 2048, 5e-6, 20, False, True),
    "qwen3_4b_frozenlake": ("frozenlake", "structured", 25, 8192, 1e-6, 20, True, True),
    "qwen3_8b_frozenlake": ("frozenlake", "structured", 50, 8192, 1e-6, 100, True, True),
    "qwen3_4b_instruct_sokoban": ("sokoban", "structured", 50, 8192, 1e-6, 100, True, False),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_table_4_and_validate(name, tmp_path_factory):
  from oel_jax import loop, tiny
  env, fmt, n, l_max, lr, steps, with_previous, thinking = PAPER[name]
  config = _load_config(name)
  assert (config.env, config.extraction.knowledge_format, config.extraction.num_trajectories,
          config.extraction.max_knowledge_tokens, config.train.learning_rate,
          config.consolidation.steps, config.extraction.with_previous,
          config.rollout.enable_thinking) == (env, fmt, n, l_max, lr, steps, with_previous,
                                              thinking)
  assert config.extraction.num_runs == 10 and config.consolidation.games_per_step == 64
  assert config.train.k == 256 and config.evaluation.num_games == 128
  # Valid once config.model names a checkpoint directory (the tiny one stands in).
  ckpt = str(tmp_path_factory.getbasetemp() / "tiny_ckpt")
  if not os.path.isdir(ckpt):
    tiny.write_tiny_checkpoint(ckpt)
  config.model = ckpt
  p = loop.plan(config, num_devices=8)
  assert p.extraction.num_trajectories == n and p.consolidation.train.learning_rate == lr
  assert p.consolidation_games == steps * 64
  assert p.extraction_boards * p.extraction_plays == n * 10
  # The pools sample as the official runs do; IF-Eval follows the official README.
  sampling = lambda r: (r.temperature, r.top_p, r.top_k)
  assert sampling(p.rollout_for(0, "extraction")) == (0.7, 0.8, 20)
  assert sampling(p.rollout_for(0, "consolidation")) == (0.7, 1.0, 0)
  assert (config.ifeval.enable_thinking, config.ifeval.temperature, config.ifeval.top_p,
          config.ifeval.top_k, config.ifeval.seed, config.ifeval.max_new_tokens) == (
              False, 0.7, 0.8, 20, 42, 1280)
  # The released deploy scripts' 128 games per step is one override away.
  config.consolidation.games_per_step = 128
  assert loop.plan(config, num_devices=8).consolidation_games == steps * 128


def _one_error_line(out) -> str:
  """The error line of a CLI run that failed on bad input (exit 2, no traceback)."""
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: "), lines[-5:]
  return lines[-1]


def test_an_unknown_config_field_names_it_and_the_nearest_fields(tmp_path):
  line = _one_error_line(run_main(f"--workdir={tmp_path / 'w'}",
                                  "--config.train.learning_rat=1e-5", timeout=120))
  assert "--config.train.learning_rat: " in line and "has no field 'train.learning_rat'" in line
  assert "nearest: --config.train.learning_rate" in line
  line = _one_error_line(run_main("--config.colect.extraction_boards=3", timeout=120))
  assert "nearest: --config.collect.extraction_boards" in line
  # A moved field names its new places.
  line = _one_error_line(run_main("--config.rollout.top_p=0.9", timeout=120))
  assert ("nearest: --config.collect.extraction_sampling.top_p, "
          "--config.collect.consolidation_sampling.top_p") in line
  line = _one_error_line(run_main("--config.rounds=three", timeout=120))
  assert "--config.rounds=three" in line
  line = _one_error_line(run_main("--config=configs/no_such_config.py", timeout=120))
  assert "no such config file: configs/no_such_config.py" in line
  assert not (tmp_path / "w").exists()


def test_a_truncated_checkpoint_is_one_error_line_and_debug_shows_the_traceback(tmp_path):
  from oel_jax import tiny  # pylint: disable=import-outside-toplevel
  ckpt = tmp_path / "ckpt"
  tiny.write_tiny_checkpoint(str(ckpt))
  weights = ckpt / "model.safetensors"
  with open(weights, "r+b") as f:
    f.truncate(weights.stat().st_size - 1000)
  args = (f"--workdir={tmp_path / 'w'}", f"--config.model={ckpt}")
  line = _one_error_line(run_main(*args, timeout=300))
  assert f"config.model: {weights}: truncated: tensor " in line
  assert "but the file holds only" in line
  assert not (tmp_path / "w").exists()  # found before any work
  debug = run_main(*args, "--debug", timeout=300)
  assert debug.returncode != 0 and "Traceback" in debug.stderr
  assert "ConfigError" in debug.stderr


def test_a_malformed_trajectory_line_is_one_error_line(tiny_run, tmp_path):
  """A workdir whose collected trajectories were damaged: the extract stage names the file,
  the line and the field."""
  import shutil  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  os.makedirs(workdir / "round_000")
  shutil.copy(os.path.join(tiny_run.workdir, "config.json"), workdir / "config.json")
  for name in ("collect.done.json", "trajectories"):
    source = os.path.join(tiny_run.workdir, "round_000", name)
    (shutil.copytree if os.path.isdir(source) else shutil.copy)(source,
                                                                 workdir / "round_000" / name)
  path = workdir / "round_000" / "trajectories" / "extraction.jsonl"
  lines = path.read_text().splitlines()
  lines[2] = lines[2].replace('"turns"', '"turnz"', 1)
  path.write_text("\n".join(lines) + "\n")
  line = _one_error_line(run_main(f"--workdir={workdir}", "--stage=extract", "--round=0",
                                  timeout=300))
  assert f"{path}:3" in line and "turns" in line, line
  assert not (workdir / "round_000" / "extract.done.json").exists()


def test_a_round_that_keeps_skipping_non_finite_steps_stops_with_one_error_line(tmp_path):
  """A learning rate that blows the weights up: step 2's gradient is not finite, the step is
  skipped (the official behaviour) and, with a limit of one in a row, the round stops."""
  workdir = tmp_path / "run"
  out = run_main(f"--workdir={workdir}", "--config.rounds=1", "--config.evaluation.initial=False",
                 "--config.train.learning_rate=1e30",
                 "--config.consolidation.max_consecutive_skipped_steps=1", timeout=600)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: consolidation stopped at step 2: step 2 (1 in a row)"), last
  assert "consolidation step 2 skipped" in out.stderr
  lines = metrics.read_jsonl(workdir / "round_000" / "consolidation" / "metrics.jsonl")
  assert [(m["step"], m["skipped"], m["skipped_steps"]) for m in lines] == [(1, False, 0),
                                                                            (2, True, 1)]
  assert not (workdir / "round_000" / "consolidate.done.json").exists()


def test_every_script_compiles_on_this_python():
  """scripts/ are not imported by the tests; a syntax error there (say, an f-string that only
  Python 3.12 parses) would otherwise go unnoticed."""
  import glob  # pylint: disable=import-outside-toplevel
  scripts = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py")))
  assert len(scripts) >= 4
  for path in scripts:
    with open(path, encoding="utf-8") as f:
      compile(f.read(), path, "exec")  # raises SyntaxError naming the file and line
