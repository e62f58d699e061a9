"""Several local processes of one job, for the multi-process tests.

`spawn` starts commands whose output goes to temporary files, not pipes: a process blocked
on a full pipe would stall the others' collectives while a test waits on another process.
`finish` collects each one's result once all have ended and kills any left running.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence

Worker = tuple[subprocess.Popen, tempfile.SpooledTemporaryFile, tempfile.SpooledTemporaryFile]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (for a coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def spawn(commands: Sequence[Sequence[str]], *, cwd: str, env: Mapping[str, str]
          ) -> list[Worker]:
  """Starts every command at once; each one's stdout and stderr go to temporary files."""
  workers = []
  for command in commands:
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    workers.append((subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdout=out,
                                     stderr=err, text=True), out, err))
  return workers


def finish(workers: Sequence[Worker], timeout: float = 900) -> list[subprocess.CompletedProcess]:
  """Each worker's result once all have ended (any still running after ``timeout`` is
  killed, and the wait raises `subprocess.TimeoutExpired`)."""
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
