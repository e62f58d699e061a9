"""An append-only JSON Lines file that a crash cannot leave half-written in the middle.

Each record is one line written by one ``os.write`` of the whole line (``\\n`` included) on a
descriptor opened with ``O_APPEND``, then fsynced, before the caller answers the client: a
killed server loses at most the records it had not answered yet. A crash during a write can
only cut the file's last line (no ``\\n`` at its end); a reader skips such a line, and
`AppendLog` cuts it off when it opens the file again, so the next record starts a line of its
own instead of being glued to the broken one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from oel_jax.errors import InputError

log = logging.getLogger(__name__)


def _cut_torn_tail(path: str) -> int:
  """Truncates ``path`` after its last ``\\n``; returns how many bytes were cut."""
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    end = size
    while end > 0:  # Back in blocks to the last newline.
      start = max(0, end - 65536)
      f.seek(start)
      block = f.read(end - start)
      newline = block.rfind(b"\n")
      if newline >= 0:
        end = start + newline + 1
        break
      end = start
    if end < size:
      f.truncate(end)
      f.flush()
      os.fsync(f.fileno())
    return size - end


class AppendLog:
  """Appends JSON records to ``path`` one line each (see the module docstring).

  Opening cuts a torn last line (a write cut by a crash) and logs a warning. Writes from
  several threads are serialised, so lines keep whole and in the order `append` returned.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if os.path.exists(self.path):
      cut = _cut_torn_tail(self.path)
      if cut:
        log.warning("%s: cut a torn last line of %d bytes (a write a crash interrupted)",
                    self.path, cut)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    self._lock = threading.Lock()

  def append(self, record: Any) -> None:
    """Writes ``record`` as one line and fsyncs it: when this returns, the line is on disk."""
    line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    with self._lock:
      written = os.write(self._fd, line)
      if written != len(line):  # A full disk: never leave a partial line behind a good one.
        os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
        raise OSError(f"{self.path}: wrote {written} of {len(line)} bytes")
      os.fsync(self._fd)

  def close(self) -> None:
    """Closes the file (appending afterwards raises)."""
    with self._lock:
      if self._fd >= 0:
        os.close(self._fd)
        self._fd = -1


def read_lines(path: str) -> Iterator[tuple[int, Any]]:
  """``(line number, decoded record)`` for each whole line of ``path`` (none if it is
  missing); a torn last line is skipped.

  Raises:
    InputError: a line other than the last is not JSON (naming the file and line).
  """
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      if not raw.endswith(b"\n"):
        return
      try:
        yield number, json.loads(raw)
      except ValueError as e:
        raise InputError(f"{path}:{number}: not a JSON line: {e}") from None
