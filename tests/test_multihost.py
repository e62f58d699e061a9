"""One program, many hosts: the CLI on 2 processes x 2 CPU devices against 1 process x 4.

Both run ``configs/tiny.py`` (one round, shortened) on the same mesh: data 2 (across the two
processes, as across hosts) x tp 2 (within each). The two-process job must write exactly the
files the one-process run writes, once each and whole, with the same trajectories and
knowledge and the same final weights to float tolerance; and restore its own orbax
checkpoint on both processes. Processes started with different configs must both stop at
once, naming the difference.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile

import numpy as np
import pytest

from oel_jax.models.safetensors_io import SafetensorsFile
from tiny_loop_run import ROOT, main_command, main_env

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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_job(processes: int, devices: int, args_of) -> list[tuple[subprocess.Popen, ...]]:
  """Starts ``python -m oel_jax.main`` as ``processes`` processes of one job with ``devices``
  CPU devices each; ``args_of(i)`` are process i's arguments."""
  env = dict(main_env(), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  job = []
  if processes > 1:
    address = f"127.0.0.1:{_free_port()}"
    job = [f"--coordinator_address={address}", f"--num_processes={processes}"]
  workers = []
  for i in range(processes):
    # Files, not pipes: a process blocked on a full pipe would stall the others'
    # collectives while this test waits on another process.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    command = main_command(*args_of(i), *job, *([f"--process_id={i}"] if job else []))
    workers.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err,
                                     text=True), out, err))
  return workers


def finish(workers: list[tuple[subprocess.Popen, ...]], timeout: float = 900
           ) -> list[subprocess.CompletedProcess]:
  """Each worker's result once all have ended (any still running after ``timeout`` is
  killed)."""
  results = []
  try:
    for process, out, err in workers:
      process.wait(timeout=timeout)
      out.seek(0)
      err.seek(0)
      results.append(subprocess.CompletedProcess(process.args, process.returncode, out.read(),
                                                 err.read()))
  finally:
    for process, out, err in workers:
      if process.poll() is None:
        process.kill()
      out.close()
      err.close()
  return results


def _files(workdir: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(folder, name), workdir)
                for folder, _, names in os.walk(workdir) for name in names)


def _read(path: str, workdir: str) -> bytes:
  with open(path, "rb") as f:
    # The evaluated model is named by its path in the workdir.
    return f.read().replace(workdir.encode(), b"W")


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  # Side by side: each of the three processes waits on the others' collectives or compiles
  # at times, so together they finish sooner than one after the other on a 2-core machine.
  single = start_job(1, 4, lambda i: (f"--workdir={one}", *SHORT))
  job = start_job(2, 2, lambda i: (f"--workdir={two}", *SHORT))
  [single], job = finish(single), finish(job)
  assert single.returncode == 0, single.stderr[-3000:]
  for i, p in enumerate(job):
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

  # Both processes restore the last consolidation checkpoint (each its own shards) and
  # export the same model again.
  model = os.path.join(two, "round_000", "model")
  os.rename(model, str(tmp_path / "model"))
  os.unlink(os.path.join(two, "round_000", "consolidate.done.json"))
  again = finish(start_job(2, 2, lambda i: (f"--workdir={two}", *SHORT, "--stage=consolidate",
                                            "--round=0")))
  for i, p in enumerate(again):
    assert p.returncode == 0, f"process {i}:\n{p.stderr[-3000:]}"
    assert "consolidation: resuming from step 2" in p.stderr
  _assert_same_weights(model, str(tmp_path / "model"), exact=True)


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
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: process {i} of 2: the processes were not started alike: "
                           f"config.seed differs (this process: {i}; digests process 0: "), last
  assert not os.path.exists(workdir)  # stopped before anything was written
