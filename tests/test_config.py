"""The run's settings tree (oel_jax.config, oel_jax.settings): defaults declared once, every
config file valid and unchanged by a trip through config.json, errors named by their paths."""

import dataclasses
import glob
import importlib.util
import json
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from oel_jax import config as config_lib
from oel_jax import settings
from oel_jax.consolidate import ConsolidationConfig
from oel_jax.envs import RolloutConfig
from oel_jax.evaluate import EvalConfig
from oel_jax.experience import ExtractionConfig
from oel_jax.parallel import MeshConfig
from oel_jax.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "oel_jax", "demo", "config.py")


def _config_files() -> list[str]:
  """configs/*.py that define get_config, and the demo's when its model is built."""
  paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
  paths = [p for p in paths if "def get_config" in open(p, encoding="utf-8").read()
           or "import get_config" in open(p, encoding="utf-8").read()]
  if os.path.isfile(os.path.join(ROOT, "oel_jax", "assets", "demo_model", "model.safetensors")):
    paths.append(DEMO)
  return paths


def _load(path: str):
  return config_lib.load_config_file(path)


@pytest.mark.parametrize("path", _config_files(), ids=os.path.basename)
def test_every_config_file_validates_and_round_trips_through_config_json(path):
  config = config_lib.RunConfig.from_dict(_load(path))
  again = config_lib.RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
  assert again == config
  assert again.to_dict() == config.to_dict()


def test_the_config_files_are_found():
  names = {os.path.basename(p) for p in _config_files()}
  assert {"tiny.py", "demo.py", "qwen3_4b_frozenlake.py"} <= names
  assert "paper.py" not in names  # a helper, not a config


def test_the_defaults_exist_once():
  default = config_lib.default_config()
  assert config_lib.RunConfig() == config_lib.RunConfig.from_dict(default.to_dict())
  assert config_lib.RunConfig() == config_lib.RunConfig.from_dict(default)
  # The sections are the stages' configs: their defaults are the stages' defaults.
  run = config_lib.RunConfig()
  assert run.train == TrainConfig() and run.mesh == MeshConfig()
  assert run.consolidation == ConsolidationConfig()
  assert settings.narrow(ExtractionConfig, run.extraction) == ExtractionConfig()
  assert run.evaluation_config() == EvalConfig()
  assert dataclasses.replace(run.rollout_for(0), seed=0) == RolloutConfig()


def test_the_defaults_that_had_drifted_are_the_loops():
  assert ExtractionConfig().pool_order == "chunks"
  assert EvalConfig().sampling_seeds == tuple(range(10))


def test_key_paths_are_the_config_files_and_loop_set_fields_are_not_among_them():
  data = config_lib.RunConfig().to_dict()
  assert "seed" not in data["extraction"] and "train" not in data["consolidation"]
  assert set(data["rollout"]) == {"enable_thinking", "keep_reasoning", "max_new_tokens",
                                  "max_batch_size", "slots"}
  assert set(data["evaluation"]) >= {"initial", "in_context", "in_context_run",
                                     "sampling_seeds"}
  assert data["collect"]["extraction_sampling"] == {"temperature": 0.7, "top_k": 20,
                                                    "top_p": 0.8}
  assert data["collect"]["consolidation_sampling"] == {"temperature": 0.7, "top_k": 0,
                                                       "top_p": 1.0}


def test_sections_repeating_a_top_level_setting_take_it():
  run = config_lib.RunConfig.from_dict({"env": "sokoban", "progress": False,
                                        "train": {"learning_rate": 5e-6}})
  assert run.rollout.env == run.evaluation.env == "sokoban"
  assert not run.rollout.progress and not run.evaluation_config().progress
  assert run.consolidation.train.learning_rate == 5e-6
  assert run.rollout_for(0, "extraction").top_k == 20
  assert run.extraction_for(0).seed != run.extraction_for(1).seed


def test_a_placeholder_field_takes_a_command_line_override_and_zero_means_none(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text("from oel_jax.config import default_config\n\n"
                  "def get_config():\n"
                  "  c = default_config()\n"
                  "  c.rollout.max_batch_size = 0\n"
                  "  return c\n")
  argv = ["prog", f"--config={path}", "--config.extraction.max_new_tokens=80",
          "--config.evaluation.max_batch_size=4", "--config.evaluation.sampling_seeds=(3, 4)"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  run = config_lib.RunConfig.from_dict(values.config)
  assert run.extraction.max_new_tokens == 80 and run.evaluation.max_batch_size == 4
  assert run.rollout.max_batch_size is None and run.consolidation.max_sampling_batch is None
  assert run.evaluation.sampling_seeds == (3, 4)
  assert config_lib.RunConfig.from_dict(values.config.to_dict()) == run


def test_every_error_is_reported_at_once_under_its_path():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.RunConfig.from_dict({
        "rounds": 0, "extraction": {"num_runs": 0, "seed": 3, "n": 2},
        "collect": {"extraction_sampling": {"top_p": 0.0}},
        "train": {"temperature": 0.5, "tail": 1}, "evaluation": {"sampling_seeds": [1, 1]},
        "mesh": {"tp": 0}, "consolidation": {"steps": 0}})
  message = str(e.value)
  for line in [
      "config.rounds must be an integer >= 1, got 0",
      "config.extraction.num_runs must be an integer >= 1, got 0",
      "config.extraction.seed: not settable here; every seed derives from config.seed",
      "config.extraction.n: unknown field; ExtractionSection has no field 'n' (fields: "
      "enable_thinking,",
      "config.collect.extraction_sampling.top_p must be in (0, 1], got 0.0",
      "config.train.tail must be a bool, got 1",
      "config.evaluation.sampling_seeds must be one or more distinct integers >= 0",
      "config.mesh: axis sizes must be positive or -1 (at most one)",
      # A section with an invalid field still runs the cross-checks that do not read it.
      "config.consolidation.steps must be an integer >= 1, got 0",
      "config.consolidation.temperature (0.7) differs from config.train.temperature (0.5)",
  ]:
    assert line in message, (line, message)
  assert "config.rollout.env" not in message  # a field filled in is checked at its source


def test_sampling_settings_follow_one_rule_everywhere():
  # Temperature 0 is greedy decoding wherever a stage samples...
  for cls in (settings.SamplingParams, RolloutConfig, ExtractionConfig, EvalConfig,
              config_lib.IfevalConfig, config_lib.PoolSampling):
    assert cls(temperature=0.0).temperature == 0.0
    with pytest.raises(ValueError, match=rf"{cls.__name__}.temperature must be >= 0"):
      cls(temperature=-0.1)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.top_p must be in \(0, 1\]"):
      cls(top_p=1.5)
  # ... except that consolidation's loss divides by it: train.temperature (> 0) says so.
  with pytest.raises(ValueError, match="differs from ConsolidationConfig.train.temperature"):
    ConsolidationConfig(temperature=0.0)
  assert ExtractionConfig(max_knowledge_tokens=64).sampling_params.max_new_tokens == 64
  assert RolloutConfig(top_k=5).sampling_params.generate_kwargs() == {
      "max_new_tokens": 1024, "temperature": 0.7, "top_k": 5, "top_p": 1.0}


def test_the_mesh_resolves_its_free_axis():
  assert MeshConfig().resolve(8) == {"data": 1, "fsdp": 8, "tp": 1}
  assert MeshConfig(data=2, fsdp=2, tp=2).resolve(8) == {"data": 2, "fsdp": 2, "tp": 2}
  with pytest.raises(ValueError, match="8 devices do not divide by the fixed axes"):
    MeshConfig(tp=3).resolve(8)
  with pytest.raises(ValueError, match="needs 4 devices, have 8"):
    MeshConfig(fsdp=2, tp=2).resolve(8)
  with pytest.raises(ValueError, match="at most one"):
    MeshConfig(data=-1, fsdp=-1)


def test_stage_configs_round_trip_with_one_from_dict():
  config = ConsolidationConfig(steps=3, train=TrainConfig(learning_rate=5e-6))
  assert settings.load(ConsolidationConfig, json.loads(json.dumps(config.to_dict()))) == config
  with pytest.raises(ValueError, match=r"ConsolidationConfig.train.kk: unknown field; "
                     r"TrainConfig has no field 'kk' \(fields: b1, b2,"):
    settings.load(ConsolidationConfig, {"train": {"kk": 1}})


def test_a_workdir_recorded_with_zero_for_unset_integers_still_resumes(tmp_path):
  """Before the tree, config.json held 0 for an unset optional integer; now it holds null."""
  from oel_jax import loop  # pylint: disable=import-outside-toplevel
  config = _load(os.path.join(ROOT, "configs", "tiny.py"))
  old = config_lib.RunConfig.from_dict(config).to_dict()
  assert old["rollout"]["max_batch_size"] is None
  old["rollout"]["max_batch_size"] = old["evaluation"]["max_batch_size"] = 0
  (tmp_path / loop.CONFIG_FILE).write_text(json.dumps(old))
  loop.OnlineLoop(config, str(tmp_path), num_devices=1).check_workdir()
  config.rollout.max_batch_size = 4
  with pytest.raises(config_lib.ConfigError, match=r"rollout.max_batch_size: None -> 4"):
    loop.OnlineLoop(config, str(tmp_path), num_devices=1).check_workdir()


# Where the test declares a new setting: after the last field of a section, once as a nested
# section's field and once as a top-level one.
_NEW_SETTINGS = {
    "logging.flush_seconds": (
        '  plot: bool = settings.boolean(True)\n  """``workdir/plots/rounds.png``."""\n',
        '\n  flush_seconds: int = settings.integer(30, minimum=1)\n'
        '  """Seconds between TensorBoard flushes."""\n'),
    "keep_rounds": (
        '  logging: LoggingConfig = settings.section(LoggingConfig)\n'
        '  """TensorBoard and plots."""\n',
        '\n  keep_rounds: int = settings.integer(30, minimum=1)\n'
        '  """Rounds whose model/ is kept."""\n'),
}


@pytest.mark.parametrize("key", sorted(_NEW_SETTINGS))
def test_adding_a_setting_is_one_field_declaration(key, tmp_path, monkeypatch):
  """A developer's edit, made to a copy of oel_jax/config.py: one field (default, rule,
  docstring) added to one dataclass and nothing else. The setting is then in default_config,
  settable from a config file and the command line, checked by its rule under its path,
  recorded in config.json, and a workdir recorded before it existed still resumes."""
  from oel_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  source = open(config_lib.__file__, encoding="utf-8").read()
  anchor, field = _NEW_SETTINGS[key]
  assert source.count(anchor) == 1, "the anchor moved: update _NEW_SETTINGS"
  (tmp_path / "edited_config.py").write_text(source.replace(anchor, anchor + field))
  name = "_oel_config_with_a_new_setting"
  spec = importlib.util.spec_from_file_location(name, tmp_path / "edited_config.py")
  edited = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, name, edited)  # dataclasses look their module up
  spec.loader.exec_module(edited)
  section, _, leaf = key.rpartition(".")

  def get(tree, path=key):
    for part in path.split("."):
      tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
    return tree

  assert get(edited.default_config()) == 30
  assert get(edited.RunConfig()) == 30
  assert get(edited.RunConfig().to_dict()) == 30
  # A config file sets it, the command line overrides it.
  cfg = tmp_path / "cfg.py"
  cfg.write_text(f"from {name} import default_config\n\n"
                 "def get_config():\n"
                 "  c = default_config()\n"
                 f"  c.{key} = 7\n"
                 "  return c\n")

  def from_command_line(*overrides):
    argv = ["prog", f"--config={cfg}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return edited.RunConfig.from_dict(values.config)

  assert get(from_command_line()) == 7
  run = from_command_line(f"--config.{key}=5")
  assert get(run) == 5
  with pytest.raises(edited.ConfigError,
                     match=rf"config\.{key} must be an integer >= 1, got 0"):
    from_command_line(f"--config.{key}=0")
  with pytest.raises(edited.ConfigError,
                     match=rf"config\.{key} must be an integer >= 1, got -2"):
    edited.RunConfig.from_dict({section: {leaf: -2}} if section else {leaf: -2})
  # config.json round trip.
  data = json.loads(json.dumps(run.to_dict()))
  assert get(data) == 5
  assert edited.RunConfig.from_dict(data) == run
  # A workdir recorded before the setting existed resumes with its default, and refuses
  # another value, naming it.
  old = config_lib.RunConfig.from_dict(_load(os.path.join(ROOT, "configs", "tiny.py")))
  (tmp_path / "run").mkdir()
  workdir_lib.write_json(str(tmp_path / "run" / workdir_lib.CONFIG_FILE), old.to_dict())
  monkeypatch.setattr(workdir_lib, "parse", edited.parse)
  same = edited.RunConfig.from_dict(old.to_dict())
  workdir_lib.Workdir(str(tmp_path / "run"), same).record_config()
  assert get(workdir_lib.read_json(str(tmp_path / "run" / workdir_lib.CONFIG_FILE))) == 30
  changed = dataclasses.replace(same, **(
      {section: dataclasses.replace(getattr(same, section), **{leaf: 9})} if section
      else {leaf: 9}))
  with pytest.raises(config_lib.ConfigError, match=rf"{key}: 30 -> 9"):
    workdir_lib.Workdir(str(tmp_path / "run"), changed).record_config()
