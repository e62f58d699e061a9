"""The loop on recorded experience (``config.collect.source = "files"``, configs/recorded.py).

The collect stage is run in process (it loads no model): which records go to which pool, the
glob and the serve log's cut-off, and what rounds after the first read. One short round of
the whole loop runs as a user would run it (the CLI, one CPU device) on imported chat logs
with the tiny random model and no evaluation.
"""

import json
import os
import time

import pytest

from oel_jax import config as config_lib
from oel_jax import loop, metrics, plots
from oel_jax.envs import load_trajectories, write_trajectories
from oel_jax.errors import InputError
from oel_jax.stages import collect
from oel_jax.trajectories import import_chat_logs, read_served
from oel_jax.workdir import Workdir
from test_trajectories import feedback_line, served_line
from tiny_loop_run import ROOT, run_main

RECORDED_TINY = os.path.join(ROOT, "configs", "recorded.py") + ":tiny"


def _chat(i, reward=None):
  line = {"id": f"c{i}", "messages": [
      {"role": "system", "content": "You answer questions about the weather."},
      {"role": "user", "content": f"Will it rain on day {i}?"},
      {"role": "assistant", "content": "Maybe."},
      {"role": "user", "content": "Be precise."},
      {"role": "assistant", "content": f"{10 * i}% chance."}]}
  if reward is not None:
    line.update(reward=reward, feedback="vague" if reward <= 0 else "good")
  return line


def _trajectory_file(path, lines):
  chats = str(path) + ".chats"
  with open(chats, "w") as f:
    f.write("".join(json.dumps(x) + "\n" for x in lines))
  records, _ = import_chat_logs([chats])
  write_trajectories(str(path), records)
  return records


def _config(**collect):
  c = config_lib.load_config_file(RECORDED_TINY)
  c.logging.tensorboard = False
  c.logging.plot = False
  for key, value in collect.items():
    setattr(c.collect, key, value)
  return c


def _errors(c) -> str:
  with pytest.raises(loop.ConfigError) as e:
    loop.plan(c, num_devices=1)
  return str(e.value)


def test_config_errors_name_the_field(tmp_path):
  assert "config.collect.source 'files' reads config.collect.trajectory_files and/or " \
         "config.collect.served_workdir; set one" in _errors(_config(trajectory_files=""))
  message = _errors(_config(trajectory_files=f"{tmp_path}/a.jsonl, {tmp_path}/*.json",
                            served_workdir=str(tmp_path / "none"), served_until="soon"))
  assert f"config.collect.trajectory_files: '{tmp_path}/a.jsonl' matches no file" in message
  assert f"config.collect.served_workdir: '{tmp_path}/none' is not a directory" in message
  assert "config.collect.served_until: 'soon' is neither unix seconds nor an ISO 8601" in message
  c = _config(served_until="100")
  c.collect.source = "play"
  c.evaluation.in_context = True
  message = _errors(c)
  assert "config.collect.served_until: read only with config.collect.source='files' " \
         "(it is 'play')" in message
  assert "config.collect.served_until needs config.collect.served_workdir" in message
  assert "config.evaluation.in_context plays the held-out games with knowledge in context; " \
         "it needs config.evaluation.games=True" in message
  # Recorded experience has no boards: the played pools' size checks do not apply.
  _trajectory_file(tmp_path / "a.jsonl", [_chat(1)])
  c = _config(trajectory_files=str(tmp_path / "a.jsonl"))
  c.extraction.pool_order = "chunks"
  assert loop.plan(c, num_devices=1).config.collect.recorded


def _collect(c, workdir, round_):
  run = config_lib.RunConfig.from_dict(c)
  return collect.run(round_, run, Workdir(workdir, run), pool=None)


def _pools(workdir, round_):
  folder = os.path.join(workdir, f"round_{round_:03d}", "trajectories")
  return [load_trajectories(os.path.join(folder, f"{p}.jsonl"))
          for p in ("extraction", "consolidation")]


@pytest.fixture(name="recorded")
def fixture_recorded(tmp_path):
  """Two trajectory files (3 conversations) and a serve workdir (2 conversations by 105 s)."""
  files = tmp_path / "logs"
  files.mkdir()
  a = _trajectory_file(files / "a.jsonl", [_chat(1, reward=0), _chat(2)])
  b = _trajectory_file(files / "b.jsonl", [_chat(3, reward=1)])
  serve = tmp_path / "serve"
  serve.mkdir()
  with open(serve / "served.jsonl", "w") as f:
    for line in (served_line("A", "chatcmpl-1", 100.0, "a1", "r1"),
                 served_line("B", "chatcmpl-2", 101.0, "b1", "s1"),
                 served_line("C", "chatcmpl-3", 110.0, "c1", "t1")):
      f.write(json.dumps(line) + "\n")
  with open(serve / "feedback.jsonl", "w") as f:
    f.write(json.dumps(feedback_line("A", 104.0, success=True, feedback="ok")) + "\n")
  return {"files": str(files), "a": a, "b": b, "serve": str(serve), "work": str(tmp_path / "w")}


def test_every_record_goes_to_both_pools(recorded):
  c = _config(trajectory_files=f"{recorded['files']}/b.jsonl,{recorded['files']}/*.jsonl",
              served_workdir=recorded["serve"], served_until="1970-01-01T00:01:45Z")
  done = _collect(c, recorded["work"], 0)
  extraction, consolidation = _pools(recorded["work"], 0)
  # b.jsonl first (named first), then a.jsonl (the glob's other match), then the serve log.
  want = recorded["b"] + recorded["a"] + read_served(recorded["serve"], 105.0)
  assert extraction == consolidation == want
  source = done["metrics"]["source"]
  assert [os.path.basename(f["path"]) for f in source["files"]] == ["b.jsonl", "a.jsonl"]
  assert source["served"]["until"] == 105.0 and source["served"]["conversations"] == 2
  assert done["metrics"]["all"]["games"] == 5
  # Outcomes of 4 of the 5: chat 1 (reward 0), chat 3 (reward 1), served A (success).
  assert done["metrics"]["all"]["pass_rate"] == pytest.approx(2 / 3)


def test_too_few_records_for_extraction(recorded):
  c = _config(trajectory_files=f"{recorded['files']}/b.jsonl")
  with pytest.raises(InputError, match=r"round 0: 1 recorded trajectories in config.collect."
                     r"trajectory_files=.*config.extraction \(num_trajectories = 2, pool_order "
                     r"'shuffle'\) needs 2"):
    _collect(c, recorded["work"], 0)


def _append_served(serve, line):
  with open(os.path.join(serve, "served.jsonl"), "a") as f:
    f.write(json.dumps(line) + "\n")


@pytest.mark.parametrize("mode", ["all", "new"])
def test_later_rounds_read_all_again_or_only_what_is_new(recorded, mode):
  work = recorded["work"]
  c = _config(trajectory_files=f"{recorded['files']}/*.jsonl",
              served_workdir=recorded["serve"], later_rounds=mode)
  first = _collect(c, work, 0)
  cutoff = first["metrics"]["source"]["served"]["until"]
  assert abs(cutoff - time.time()) < 60   # no served_until: when the collect ran
  round0 = _pools(work, 0)[0]
  assert len(round0) == 6
  # Since round 0: a new file, and a request after round 0's cut-off.
  _trajectory_file(os.path.join(recorded["files"], f"c_{mode}.jsonl"), [_chat(4)])
  _append_served(recorded["serve"], served_line("D", f"chatcmpl-{mode}", cutoff + 0.5,
                                                "d1", "u1"))
  time.sleep(0.6)
  _collect(c, work, 1)
  round1 = _pools(work, 1)[0]
  new = [load_trajectories(os.path.join(recorded["files"], f"c_{mode}.jsonl"))[0],
         read_served(recorded["serve"])[-1]]
  assert new[1].metadata["conversation_id"] == "D"
  if mode == "all":
    # a.jsonl, b.jsonl and the new c_all.jsonl, then every served conversation so far.
    assert round1 == round0[:3] + new[:1] + read_served(recorded["serve"])
  else:
    assert round1 == new
    # Nothing new since round 1: round 2 has nothing to read.
    time.sleep(0.01)
    with pytest.raises(InputError, match=r"round 2: no recorded experience not read by an "
                       r"earlier round \(config.collect.later_rounds='new'\)"):
      _collect(c, work, 2)


def test_reports_without_evaluation_or_with_if_eval_only(tmp_path):
  nothing = {"stage": "evaluate", "round": 0, "seconds": 1.0, "metrics": {}, "artifacts": {}}
  export = {"stage": "export", "round": 0, "seconds": 1.0, "metrics": {"dtype": "float32"},
            "artifacts": {"export": "round_000/model"}}
  assert metrics.summary([nothing, export]) == {
      "evaluations": [], "models": {"0": "round_000/model"}, "final_model": "round_000/model"}
  assert [r["stage"] for r in metrics.records([nothing, export])] == ["export"]
  assert "nothing to evaluate" in metrics.brief("evaluate", {})
  assert not plots.plot_rounds([nothing, export], str(tmp_path / "none.png"))
  ifeval = {**nothing, "metrics": {"ifeval": {"prompt_level_strict": 0.25}}}
  assert metrics.summary([ifeval])["evaluations"] == [
      {"round": 0, "x": 1, "ifeval_prompt_level_strict": 0.25}]
  (rec,) = metrics.records([ifeval])
  assert rec["ifeval_prompt_level_strict"] == 0.25 and "pass_rate" not in rec
  assert plots.plot_rounds([ifeval], str(tmp_path / "ifeval.png"))
  with open(tmp_path / "ifeval.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_round_on_imported_chat_logs(tmp_path):
  """configs/recorded.py:tiny on a trajectory file imported from chat logs, evaluation off."""
  path = tmp_path / "chats" / "trajectories.jsonl"
  path.parent.mkdir()
  records = _trajectory_file(path, [_chat(i, reward=i % 2) for i in range(3)])
  workdir = str(tmp_path / "run")
  p = run_main(f"--config={RECORDED_TINY}", f"--workdir={workdir}",
               f"--config.collect.trajectory_files={tmp_path}/chats/*.jsonl")
  assert p.returncode == 0, p.stderr[-3000:]
  r0 = os.path.join(workdir, "round_000")
  assert load_trajectories(os.path.join(r0, "trajectories", "extraction.jsonl")) == records
  assert load_trajectories(os.path.join(r0, "trajectories", "consolidation.jsonl")) == records
  for name in ("knowledge/knowledge_0.txt", "knowledge/knowledge_1.txt", "model/config.json",
               "export.done.json"):
    assert os.path.isfile(os.path.join(r0, name)), name
  records_ = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  steps = [r for r in records_ if r["stage"] == "consolidate" and not r.get("summary")]
  assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] >= 0 for r in steps)
  assert not [r for r in records_ if r["stage"] == "evaluate"]
  evaluate = json.load(open(os.path.join(r0, "evaluate.done.json")))
  assert evaluate["metrics"] == {} and evaluate["artifacts"] == {}
  assert not os.path.exists(os.path.join(workdir, "initial"))
  assert not os.path.exists(os.path.join(workdir, "plots", "rounds.png"))
  assert json.load(open(os.path.join(workdir, "summary.json"))) == {
      "evaluations": [], "models": {"0": "round_000/model"}, "final_model": "round_000/model"}


def test_the_cli_reads_a_serve_workdir_alone(recorded, tmp_path):
  """The README's second command: the default glob emptied, a server's log read instead."""
  base = (f"--config={RECORDED_TINY}", f"--workdir={tmp_path / 'run'}", "--stage=validate",
          f"--config.collect.served_workdir={recorded['serve']}",
          "--config.collect.served_until=2026-12-01T09:00:00Z")
  p = run_main(*base, "--config.collect.trajectory_files=")
  assert p.returncode == 0 and "config OK: recorded_tiny" in p.stdout, p.stderr[-2000:]
  p = run_main(*base)   # the default glob, recorded/*.jsonl, matches nothing here
  assert p.returncode == 2
  assert "config.collect.trajectory_files: 'recorded/*.jsonl' matches no file" in p.stderr


def test_evaluation_off_loads_no_model_and_records_nothing(tmp_path):
  from oel_jax.stages import evaluate as evaluate_stage
  from oel_jax.workdir import INITIAL
  c = _config()
  c.ifeval.enabled = False
  run = config_lib.RunConfig.from_dict(c)
  done = evaluate_stage.run(INITIAL, run, Workdir(str(tmp_path), run), pool=None)
  assert (done["metrics"], done["artifacts"]) == ({}, {})
