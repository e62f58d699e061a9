"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Everything goes to a temporary file in the destination's folder (a rename is only atomic
within one file system), is flushed and fsynced, and is then renamed over the destination;
the folder is fsynced too, so the rename survives a crash. If anything fails first, the
temporary file is deleted and the destination is left as it was.

    with atomic_open("runs/metrics.jsonl") as f:  # text, UTF-8
      for line in lines:
        f.write(line)
    atomic_write_text("state.json", json.dumps(state))
    atomic_write_bytes("blob.bin", data)

`AtomicFile` is the same thing without a ``with`` block, for a writer object that commits or
aborts later (e.g. `oel_jax.envs.TrajectoryWriter`).

`replace_folder` does the same for a folder a writer fills (a model checkpoint): it is written
under ``<path>.tmp`` and then takes the place of ``path``. Two renames cannot be one, so a crash
between them leaves no ``path``; callers record completion elsewhere afterwards (the loop's
done-files) and rerun the write when it is missing.

The new file gets the permission bits of the file it replaces, or, when there is none, the
bits a plain ``open(path, "w")`` would give it (0666 less the umask), since a private temp
file (what `tempfile.mkstemp` makes) would turn checkpoints and logs unreadable to others.

The parent folder must exist: a missing one raises FileNotFoundError naming the destination
(callers that want it created call ``os.makedirs`` first, so a mistyped path is not made).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import IO, Any

from oel_jax import distributed

# Temporary files are hidden (leading dot) and end in this, so a listing or glob for the
# real names never picks one up, and a leftover from a killed process is easy to spot.
TEMP_SUFFIX = ".tmp"

_MODES = ("w", "wt", "wb")


class AtomicFile:
  """A temporary file that `commit` renames to ``path``; `abort` deletes it.

  Attributes:
    path: the destination.
    file: the open temporary file to write to (None once committed or aborted).
  """

  def __init__(self, path: str | os.PathLike[str], mode: str = "w", *,
               encoding: str = "utf-8"):
    """Opens a temporary file next to ``path``.

    Args:
      path: the destination; its folder must exist.
      mode: "w" or "wt" (text, ``encoding``) or "wb" (bytes).
      encoding: text encoding in text mode.

    Raises:
      ValueError: for any other mode.
      FileNotFoundError: when the folder of ``path`` does not exist.
    """
    self.file: IO[Any] | None = None  # First, so that __del__ works whatever fails below.
    if mode not in _MODES:
      raise ValueError(f"atomic writes take mode 'w', 'wt' or 'wb', not {mode!r}")
    self.path = os.fspath(path)
    self._folder = os.path.dirname(os.path.abspath(self.path))
    name = f".{os.path.basename(self.path)}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    self._tmp = os.path.join(self._folder, name)
    try:
      # 0o666: the umask applies as for open(); O_EXCL: never clobber someone else's file.
      fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileNotFoundError:
      if os.path.isdir(self._folder):
        raise
      # Else the error would name the temporary file, which the caller never chose.
      raise FileNotFoundError(errno.ENOENT, f"cannot write {self.path}: folder "
                              f"{self._folder} does not exist", self.path) from None
    try:
      if "b" in mode:
        self.file = os.fdopen(fd, "wb")
      else:
        self.file = os.fdopen(fd, "w", encoding=encoding)
    except BaseException:
      os.close(fd)
      _remove(self._tmp)
      raise

  def commit(self) -> None:
    """Flushes, fsyncs and closes the file, then renames it over ``path``.

    On failure the temporary file is deleted and ``path`` left as it was.
    """
    if self.file is None:
      raise ValueError(f"atomic write of {self.path} is already finished")
    f, self.file = self.file, None
    try:
      f.flush()
      os.fsync(f.fileno())
      f.close()
      try:
        os.chmod(self._tmp, os.stat(self.path).st_mode & 0o7777)
      except FileNotFoundError:
        pass  # A new file: keep the umask's bits.
      os.replace(self._tmp, self.path)
    except BaseException:
      with contextlib.suppress(OSError):  # Closed already, or failing again: keep the first error.
        f.close()
      _remove(self._tmp)
      raise
    _fsync_folder(self._folder)

  def abort(self) -> None:
    """Deletes the temporary file; ``path`` is left as it was. Does nothing once finished."""
    if self.file is not None:
      f, self.file = self.file, None
      try:
        f.close()
      finally:
        _remove(self._tmp)

  def __del__(self):
    # An AtomicFile dropped without commit (e.g. its owner raised) must not leave a temp file.
    self.abort()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", *,
                encoding: str = "utf-8") -> Iterator[IO[Any]]:
  """Opens ``path`` for writing; it is replaced when the block ends without an exception.

  Args:
    path: the destination; its folder must exist.
    mode: "w" or "wt" (text, ``encoding``) or "wb" (bytes).
    encoding: text encoding in text mode.

  Yields:
    The temporary file to write to. On an exception it is deleted and ``path`` is untouched.
  """
  target = AtomicFile(path, mode, encoding=encoding)
  try:
    yield target.file
  except BaseException:
    target.abort()
    raise
  target.commit()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
  """Replaces ``path`` with ``data``, atomically."""
  with atomic_open(path, "wb") as f:
    f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *,
                      encoding: str = "utf-8") -> None:
  """Replaces ``path`` with ``text``, atomically."""
  with atomic_open(path, "w", encoding=encoding) as f:
    f.write(text)


def replace_folder(path: str | os.PathLike[str], write: Callable[[str], None]) -> str:
  """Has ``write`` fill a fresh ``<path>.tmp`` folder, then puts it in the place of ``path``.

  A leftover ``<path>.tmp`` of a killed earlier call is deleted first; an old ``path`` only
  once ``write`` has returned.

  On several processes (`oel_jax.distributed`) every process calls this and ``write``, since
  a writer may need them all (`oel_jax.models.save_hf` gathers each tensor over the mesh and
  has process 0 write it); the folder itself is cleared and moved by process 0 alone.

  Args:
    path: the folder to (re)place; its parent must exist.
    write: called with the temporary folder's path (not yet created: writers such as
      `oel_jax.models.save_hf` make it).

  Returns:
    ``path``.
  """
  path = os.fspath(path)
  tmp = path + TEMP_SUFFIX
  _remove_folder(tmp)
  write(tmp)
  _move_folder(tmp, path)
  return path


@distributed.writer_only
def _remove_folder(path: str) -> None:
  if os.path.exists(path):
    shutil.rmtree(path)


@distributed.writer_only
def _move_folder(source: str, path: str) -> None:
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(source, path)
  _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _remove(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def _fsync_folder(folder: str) -> None:
  # Makes the rename itself durable. Best effort: some file systems refuse to open or sync
  # a folder, and the data is already safe in the renamed file.
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
