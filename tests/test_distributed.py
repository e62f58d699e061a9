"""Several processes on 127.0.0.1 form one JAX job (gloo collectives on CPU).

Each worker is a fresh interpreter with 2 simulated CPU devices; the job's global program is
checked against the same sum computed in plain numpy.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from oel_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from oel_jax import distributed

    address, count, index = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    process = distributed.start(address, count, index, timeout_s=60)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    # Each process holds its own rows; the global array is every process's rows in order.
    local = np.arange(4, dtype=np.float32).reshape(2, 2) + 10 * process.index
    rows = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))(rows)
    gathered = multihost_utils.process_allgather(rows, tiled=True)
    print(json.dumps({"index": process.index, "count": process.count,
                      "local_devices": process.local_devices, "devices": process.devices,
                      "writer": process.is_writer, "total": np.asarray(total).tolist(),
                      "rows": np.asarray(gathered).tolist()}))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_form_one_job_and_agree():
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  workers = [subprocess.Popen([sys.executable, "-c", _WORKER, address, "2", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  outputs = []
  for w in workers:
    out, err = w.communicate(timeout=180)
    assert w.returncode == 0, err[-3000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))
  local = [[[0, 1], [2, 3]], [[10, 11], [12, 13]]]
  rows = local[0] + local[1]
  for i, got in enumerate(outputs):
    assert (got["index"], got["count"], got["local_devices"], got["devices"]) == (i, 2, 2, 4)
    assert got["writer"] == (i == 0)
    assert got["rows"] == rows
    assert got["total"] == [sum(r[0] for r in rows), sum(r[1] for r in rows)]


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:1234", None, None), "go together"),
    (("127.0.0.1", 2, 0), "HOST:PORT"),
    (("127.0.0.1:x", 2, 0), "HOST:PORT"),
    (("127.0.0.1:1234", 0, 0), "--num_processes must be an integer >= 1, got 0"),
    (("127.0.0.1:1234", 2, 2), r"--process_id must be an integer in \[0, 2\), got 2"),
    (("127.0.0.1:1234", 2, True), "--process_id must be"),
])
def test_bad_start_arguments_are_named(args, message):
  with pytest.raises(ValueError, match=message):
    distributed.start(*args)


def test_no_arguments_and_no_cluster_is_one_process():
  # In a fresh process, where start() asks JAX to detect a cluster...
  code = ("from oel_jax import distributed; p = distributed.start(); "
          "print(p.index, p.count, p.is_writer)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["0", "1", "True"]
  # ... and in one where JAX already ran, too late to join a cluster.
  jax.numpy.ones(2).block_until_ready()
  process = distributed.start()
  assert (process.index, process.count, process.is_writer) == (0, 1, True)


_AGREE = textwrap.dedent("""
    import sys
    from oel_jax import distributed

    address, index, config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    distributed.start(address, 2, index, timeout_s=60)
    try:
      distributed.check_agreement({"config": config, "code": "v1"})
    except distributed.DisagreementError as e:
      print("DISAGREE", e)
      sys.exit(3)
    print("AGREE")
""")


@pytest.mark.parametrize("configs", [("a", "a"), ("a", "b")])
def test_processes_started_differently_stop_naming_the_difference(configs):
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  workers = [subprocess.Popen([sys.executable, "-c", _AGREE, address, str(i), configs[i]],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  results = [(w.communicate(timeout=180), w.returncode) for w in workers]
  for i, ((out, err), code) in enumerate(results):
    if configs[0] == configs[1]:
      assert code == 0 and "AGREE" in out, err[-3000:]
    else:
      assert code == 3, err[-3000:]
      assert f"process {i} of 2" in out and "config differs" in out and "code" not in \
          out.split("started alike:")[1].split(".")[0]
      assert distributed.digest("a")[:12] in out and distributed.digest("b")[:12] in out


_WRITE = textwrap.dedent("""
    import json, os, sys, time
    from oel_jax import distributed

    address, index, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    distributed.start(address, 2, index, timeout_s=60)
    path = os.path.join(folder, "state.json")

    @distributed.writer_only
    def write(text):
      with open(path, "a") as f:  # a second writer would leave two lines
        f.write(text + "\\n")
      return "written"

    @distributed.writer_only
    def fail():
      raise OSError("disk full")

    if index == 1:
      time.sleep(2)  # process 0 is at write() long before this process looks for the file
    seen_before = os.path.exists(path)
    returned = write(f"process {index}")
    with open(path) as f:
      seen_after = f.read()
    try:
      fail()
      error = None
    except Exception as e:
      error = f"{type(e).__name__}: {e}"
    print(json.dumps({"before": seen_before, "returned": returned, "after": seen_after,
                      "error": error, "writer": distributed.is_writer()}))
""")


def test_one_process_writes_and_the_others_wait_then_read(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  workers = [subprocess.Popen([sys.executable, "-c", _WRITE, address, str(i), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  results = []
  for w in workers:
    out, err = w.communicate(timeout=180)
    assert w.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  first, second = results
  # Neither saw the file before the write, both see process 0's one line after it.
  assert [r["before"] for r in results] == [False, False]
  assert [r["after"] for r in results] == ["process 0\n"] * 2
  assert (first["returned"], second["returned"]) == ("written", None)
  assert (first["writer"], second["writer"]) == (True, False)
  assert first["error"] == "OSError: disk full"
  assert second["error"].startswith("WriterError: process 0 failed in __main__.fail")


# A job that loses a process. Each worker runs collectives in a loop and writes its step to a
# file; the test kills one with SIGKILL, and the others must stop within the peer timeout
# (plus the watchdog's look interval and start-up slack), exit 1 and say which process died.
_LOOP = textwrap.dedent("""
    import sys, time
    import numpy as np
    from jax.experimental import multihost_utils
    from oel_jax import distributed

    address, count, index, timeout, idle, failing, step_file = sys.argv[1:8]
    count, index, idle, failing = int(count), int(index), int(idle), int(failing)
    distributed.start(address, count, index, timeout_s=60, peer_timeout_s=float(timeout))
    try:
      for step in range(10**6):
        multihost_utils.process_allgather(np.asarray([step], np.int32))
        with open(step_file, "w") as f:
          f.write(str(step))
        if step == 5 and index == idle:
          time.sleep(600)  # work of its own, no collective: its peer's death goes unseen
        if step == 20 and index == failing:
          raise OSError("disk full")
        time.sleep(0.05)
    except Exception as e:
      distributed.stop(f"process {index} of {count}: {type(e).__name__}: {e}", 1,
                       peer_may_be_the_cause=not isinstance(e, OSError))
""")

PEER_TIMEOUT_S = 4


def _lose_a_process(tmp_path, count: int, victim: int = -1, idle: int = -1,
                    failing: int = -1) -> list[tuple[int, float, str]]:
  """Runs a job of ``count`` processes; once all have passed step 5, SIGKILLs process
  ``victim`` (if any; process ``idle`` is then at work of its own, process ``failing``
  raises an error of its own at step 20). Each other process's return code, seconds from
  the kill (or step 5) to its exit, and stderr."""
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  steps = [tmp_path / f"step_{i}" for i in range(count)]
  errs = [open(tmp_path / f"err_{i}", "w+") for i in range(count)]
  workers = [subprocess.Popen([sys.executable, "-c", _LOOP, address, str(count), str(i),
                               str(PEER_TIMEOUT_S), str(idle), str(failing), str(steps[i])],
                              env=env, stdout=subprocess.DEVNULL, stderr=errs[i], text=True)
             for i in range(count)]
  try:
    deadline = time.monotonic() + 120
    while not all(s.exists() and s.read_text() not in ("", "0", "1", "2", "3", "4")
                  for s in steps):
      assert time.monotonic() < deadline and all(w.poll() is None for w in workers), \
          [open(e.name).read()[-2000:] for e in errs]
      time.sleep(0.05)
    if victim >= 0:
      time.sleep(0.5)  # the others are in their next collective, or at their own work
      workers[victim].send_signal(signal.SIGKILL)
    start, results = time.monotonic(), []
    for i, (worker, err) in enumerate(zip(workers, errs)):
      if i != victim:
        worker.wait(timeout=120)
        err.seek(0)
        results.append((worker.returncode, time.monotonic() - start, err.read()))
    return results
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
    for e in errs:
      e.close()


def test_a_killed_process_stops_the_others_naming_it(tmp_path):
  # Process 0 is in a collective with the killed one (on CPU, gloo fails it at once), process
  # 1 at work of its own: both stop after the peer timeout, naming process 2.
  for i, (code, seconds, err) in enumerate(_lose_a_process(tmp_path, 3, victim=2, idle=1)):
    assert code == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        f"error: process {i} of 3: process 2 has given no sign of life for {PEER_TIMEOUT_S} s "
        "(it died or hangs); this process stops too. Re-run the same command on every "
        "host"), err[-3000:]
    # The watchdog looks every half second here.
    assert PEER_TIMEOUT_S - 1 < seconds < PEER_TIMEOUT_S + 10, seconds


def test_a_killed_coordinator_stops_the_others_at_once(tmp_path):
  # Process 0 runs the job's key-value store: JAX ends the others when it goes, with its
  # own message (and, when the watchdog gets there first, ours).
  [(code, seconds, err)] = _lose_a_process(tmp_path, 2, victim=0)
  assert code != 0, err[-3000:]
  assert "another task died" in err or "process 0, which runs the job's coordinator, cannot " \
      "be reached" in err, err[-3000:]
  assert seconds < PEER_TIMEOUT_S + 10, seconds


def test_a_process_stopping_on_its_error_stops_the_others_at_once(tmp_path):
  (code, seconds, err), (own_code, _, own_err) = _lose_a_process(tmp_path, 2, failing=1)
  assert own_code == 1, own_err[-3000:]
  assert own_err.strip().splitlines()[-1] == "error: process 1 of 2: OSError: disk full"
  assert code == 1, err[-3000:]
  assert err.strip().splitlines()[-1].startswith(
      "error: process 0 of 2: process 1 stopped on an error (its log says which); this "
      "process stops too."), err[-3000:]
  assert seconds < PEER_TIMEOUT_S, seconds  # told, not timed out
