"""One program, many hosts: the CLI on 2 processes x 2 CPU devices against 1 process x 4.

Both run ``configs/tiny.py`` (one round, shortened) on the same mesh: data 2 (across the two
processes, as across hosts) x tp 2 (within each). The two-process job must write exactly the
files the one-process run writes, once each and whole, with the same trajectories and
knowledge and the same final weights to float tolerance. Killed in consolidation (one
process SIGKILLed, the other stopping on its own within the peer timeout, naming it), the
job started again restores its orbax checkpoint on both processes and ends with exactly the
uninterrupted job's weights. Processes started with different configs must both stop at
once, naming the difference.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from oel_jax import config as config_lib
from oel_jax import loop
from oel_jax.models.safetensors_io import SafetensorsFile
from processes import Worker, finish, free_port, spawn
from tiny_loop_run import ROOT, TINY_CONFIG, main_command, main_env

# configs/tiny.py cut to what shows the job behaves as one process: one round, no initial
# or in-context evaluation, no IF-Eval, shorter replies; the mesh splits the batch across
# processes (data) and the heads within each (tp). The bfloat16 export loads the round's
# model back onto the mesh and writes it again.
SHORT = ("--config.rounds=1", "--config.evaluation.initial=False",
         "--config.evaluation.in_context=False", "--config.ifeval.enabled=False",
         "--config.rollout.max_new_tokens=16", "--config.evaluation.max_new_tokens=16",
         "--config.evaluation.num_games=4", "--config.extraction.max_new_tokens=16",
         "--config.consolidation.max_new_tokens=16",
         "--config.export.dtype=bfloat16",
         "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tp=2",
         "--config.progress=False")

PEER_TIMEOUT_S = 5
"""--peer_timeout of the killed job: how long its survivor may wait for the dead process."""


def start_job(processes: int, devices: int, args_of) -> list[Worker]:
  """Starts ``python -m oel_jax.main`` as ``processes`` processes of one job with ``devices``
  CPU devices each; ``args_of(i)`` are process i's arguments."""
  env = dict(main_env(), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  job = []
  if processes > 1:
    job = [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
  return spawn([main_command(*args_of(i), *job, *([f"--process_id={i}"] if job else []))
                for i in range(processes)], cwd=ROOT, env=env)


def _files(workdir: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(folder, name), workdir)
                for folder, _, names in os.walk(workdir) for name in names)


def _read(path: str, workdir: str) -> bytes:
  with open(path, "rb") as f:
    # The evaluated model is named by its path in the workdir.
    return f.read().replace(workdir.encode(), b"W")


@dataclasses.dataclass(frozen=True)
class Runs:
  """The module's uninterrupted runs of `SHORT`: one process x 4 devices and 2 x 2."""

  one: str
  """The one-process run's workdir."""
  two: str
  """The two-process job's workdir."""
  single: subprocess.CompletedProcess
  """The one-process run's result."""
  job: list[subprocess.CompletedProcess]
  """Each process's result in the job."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
  root = tmp_path_factory.mktemp("multihost")
  one, two = str(root / "one"), str(root / "two")
  # Side by side: each of the three processes waits on the others' collectives or compiles
  # at times, so together they finish sooner than one after the other on a 2-core machine.
  single = start_job(1, 4, lambda i: (f"--workdir={one}", *SHORT))
  job = start_job(2, 2, lambda i: (f"--workdir={two}", *SHORT))
  try:
    [single] = finish(single)
  except BaseException:
    for process, _, _ in job:  # not left running after the test
      process.kill()
    raise
  return Runs(one, two, single, finish(job))


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(runs):
  one, two = runs.one, runs.two
  assert runs.single.returncode == 0, runs.single.stderr[-3000:]
  for i, p in enumerate(runs.job):
    assert p.returncode == 0, f"process {i}:\n{p.stderr[-3000:]}"

  # Exactly the files of the one-process run: one copy each, no leftover temporary file.
  # TensorBoard names its event file by time and host; orbax's checkpoint folders hold each
  # process's shards of the train state, by design.
  def comparable(files):
    return [f for f in files if not f.startswith("tensorboard/events.out.tfevents.") and
            "/consolidation/checkpoints/" not in "/" + f]

  files = _files(two)
  assert comparable(files) == comparable(_files(one))
  assert not [f for f in files if f.endswith(".tmp") or "/." in "/" + f], files
  assert len([f for f in files if f.startswith("tensorboard/")]) == 1

  for name in ("trajectories/extraction.jsonl", "trajectories/consolidation.jsonl",
               "evaluation/games.jsonl", "knowledge/knowledge_0.txt",
               "knowledge/knowledge_1.txt"):
    path = os.path.join("round_000", name)
    assert _read(os.path.join(two, path), two) == _read(os.path.join(one, path), one), path

  for folder in ("model", "export"):
    _assert_same_weights(os.path.join(two, "round_000", folder),
                         os.path.join(one, "round_000", folder))


# What a run writes from consolidation on, in round 0 (the job's files without them are those
# of a job stopped after extraction).
_FROM_CONSOLIDATION = ("consolidate.done.json", "consolidation", "model", "evaluate.done.json",
                       "evaluation", "export.done.json", "export")


@pytest.mark.slow
def test_killed_in_consolidation_the_job_stops_and_resumes_to_the_same_weights(runs, tmp_path):
  assert all(p.returncode == 0 for p in runs.job), "the uninterrupted job failed"
  # The uninterrupted job's workdir as it was when extraction finished.
  workdir = str(tmp_path / "killed")
  shutil.copytree(runs.two, workdir)
  for name in _FROM_CONSOLIDATION:
    path = os.path.join(workdir, "round_000", name)
    (shutil.rmtree if os.path.isdir(path) else os.unlink)(path)
  args = lambda i: (f"--workdir={workdir}", *SHORT, f"--peer_timeout={PEER_TIMEOUT_S}")

  # Process 1 is killed once both have saved consolidation's first step (orbax renames the
  # step's folder when every process has written its shards); process 0 stops too, naming it.
  job = start_job(2, 2, args)
  checkpoint = os.path.join(workdir, "round_000", "consolidation", "checkpoints", "1")
  deadline = time.monotonic() + 600
  while not os.path.isdir(checkpoint):
    assert time.monotonic() < deadline and all(p.poll() is None for p, _, _ in job), \
        _output(job)
    time.sleep(0.02)
  job[1][0].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  survivor, _ = finish(job, timeout=PEER_TIMEOUT_S + 60)
  assert time.monotonic() - killed < PEER_TIMEOUT_S + 30
  assert survivor.returncode == 1, survivor.stderr[-3000:]
  assert survivor.stderr.strip().splitlines()[-1].startswith(
      f"error: process 0 of 2: process 1 has given no sign of life for {PEER_TIMEOUT_S} s (it "
      "died or hangs); this process stops too."), survivor.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "round_000", "consolidate.done.json"))

  # The same command again on both: consolidation resumes from step 1 and the run ends with
  # the uninterrupted job's weights and games.
  again = finish(start_job(2, 2, args))
  for i, p in enumerate(again):
    assert p.returncode == 0, f"process {i}:\n{p.stderr[-3000:]}"
    assert "consolidation: resuming from step 1" in p.stderr
  for folder in ("model", "export"):
    _assert_same_weights(os.path.join(workdir, "round_000", folder),
                         os.path.join(runs.two, "round_000", folder), exact=True)
  path = os.path.join("round_000", "evaluation", "games.jsonl")
  assert _read(os.path.join(workdir, path), workdir) == _read(os.path.join(runs.two, path),
                                                              runs.two)


def _output(job) -> str:
  texts = []
  for i, (_, _, err) in enumerate(job):
    err.seek(0)
    texts.append(f"process {i}:\n{err.read()[-2000:]}")
  return "\n".join(texts)


def _assert_same_weights(got: str, want: str, exact: bool = False) -> None:
  # Ours reads bfloat16 (safetensors.numpy does not).
  a, b = (SafetensorsFile(os.path.join(w, "model.safetensors")) for w in (got, want))
  assert sorted(a.keys()) == sorted(b.keys())
  for key in a.keys():
    x, y = (np.asarray(f.read(key), np.float32) for f in (a, b))
    if exact:
      np.testing.assert_array_equal(x, y, err_msg=key)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=key)


def test_processes_started_with_different_configs_both_stop_naming_it(tmp_path):
  workdir = str(tmp_path / "run")
  job = finish(start_job(2, 1, lambda i: (f"--workdir={workdir}", "--config.mesh.data=2",
                                          f"--config.seed={i}")), timeout=300)
  for i, p in enumerate(job):
    assert p.returncode == 2, f"process {i}:\n{p.stderr[-3000:]}"
    # One error line; gRPC may log the coordinator's closed socket after it (seen under load).
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith(
        f"error: process {i} of 2: the processes were not started alike: "
        f"config.seed differs (this process: {i}; digests process 0: "), errors[0]
  assert not os.path.exists(workdir)  # stopped before anything was written


# ---- device counts (in process: the session's 8 simulated devices, no model loaded) ----


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_the_tiny_config_fits_every_device_count_that_divides_its_model(devices):
  # The default mesh puts every device on fsdp. A consolidation step's rows are padded up to
  # the mesh (tests/test_consolidate.py runs 2 games per step on 8 devices), so the 2 games
  # per step need not divide by them.
  plan = loop.plan(config_lib.load_config_file(TINY_CONFIG), num_devices=devices)
  assert plan.mesh_shape == {"data": 1, "fsdp": devices, "tp": 1}


def test_a_device_count_the_model_cannot_be_split_over_is_named_before_any_work():
  with pytest.raises(loop.ConfigError, match=re.escape(
      "config.mesh: the mesh {'data': 1, 'fsdp': 3, 'tp': 1} cannot split the model's "
      "parameters: embed: dimension 1 of shape (2048, 256) has size 256, which mesh axis fsdp "
      "(size 3) does not divide")):
    loop.plan(config_lib.load_config_file(TINY_CONFIG), num_devices=3)
