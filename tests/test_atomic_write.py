"""Tests for oel_jax.atomic_write, against the real file system."""

import gc
import os
import stat

import pytest

from oel_jax.atomic_write import (AtomicFile, atomic_open, atomic_write_bytes,
                                  atomic_write_text, replace_folder)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
  old = os.umask(0o022)
  yield
  os.umask(old)


def test_text_write_creates_then_replaces(tmp_path):
  path = tmp_path / "a.txt"
  atomic_write_text(path, "héllo\n")
  assert path.read_bytes() == "héllo\n".encode("utf-8")  # UTF-8 whatever the locale.
  with atomic_open(path) as f:
    f.write("new")
    assert path.read_text() == "héllo\n"  # Not visible until the block ends.
  assert path.read_text() == "new"
  assert os.listdir(tmp_path) == ["a.txt"]


def test_binary_write(tmp_path):
  path = tmp_path / "b.bin"
  data = bytes(range(256)) * 3
  atomic_write_bytes(path, data)
  assert path.read_bytes() == data
  with atomic_open(str(path), "wb") as f:  # A str path too, and several writes.
    f.write(b"\x00\r\n")
    f.write(b"\xff")
  assert path.read_bytes() == b"\x00\r\n\xff"
  assert os.listdir(tmp_path) == ["b.bin"]


def test_new_file_appears_only_at_the_end(tmp_path):
  path = tmp_path / "new.txt"
  with atomic_open(path, "wt") as f:
    f.write("x")
    assert not path.exists()
    # The temporary file is hidden, next to the target, and named after it.
    [tmp] = os.listdir(tmp_path)
    assert tmp.startswith(".new.txt.") and tmp.endswith(".tmp")
  assert path.read_text() == "x"


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, exc):
  path = tmp_path / "keep.json"
  path.write_text("old")
  with pytest.raises(exc):
    with atomic_open(path) as f:
      f.write("half of the new ")
      raise exc("stopped mid-file")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["keep.json"]
  fresh = tmp_path / "fresh.json"
  with pytest.raises(exc):
    with atomic_open(fresh, "wb") as f:
      f.write(b"half")
      raise exc("stopped mid-file")
  assert os.listdir(tmp_path) == ["keep.json"]  # Neither the target nor a temporary file.


def test_missing_folder_names_the_path(tmp_path):
  path = tmp_path / "no" / "such" / "folder" / "x.txt"
  with pytest.raises(FileNotFoundError, match="does not exist") as info:
    atomic_write_text(path, "x")
  assert str(path) in str(info.value) and info.value.filename == str(path)
  assert os.listdir(tmp_path) == []


def test_rejects_reading_and_appending_modes(tmp_path):
  for mode in ("r", "a", "w+", "ab", "x"):
    with pytest.raises(ValueError, match="mode"):
      AtomicFile(tmp_path / "x", mode)
  assert os.listdir(tmp_path) == []


def test_failed_rename_removes_the_temp_file(tmp_path):
  (tmp_path / "dir").mkdir()
  (tmp_path / "dir" / "inside").write_text("kept")
  with pytest.raises(OSError):  # A file cannot replace a folder.
    atomic_write_text(tmp_path / "dir", "x")
  assert sorted(os.listdir(tmp_path)) == ["dir"]
  assert (tmp_path / "dir" / "inside").read_text() == "kept"


def test_new_file_gets_plain_open_permissions(tmp_path):
  old = os.umask(0o027)
  try:
    atomic_write_text(tmp_path / "new", "x")
    (tmp_path / "plain").write_text("x")
  finally:
    os.umask(old)
  assert _mode(tmp_path / "new") == _mode(tmp_path / "plain") == 0o640


def test_replaced_file_keeps_its_permissions(tmp_path, umask_022):
  path = tmp_path / "private"
  path.write_text("old")
  os.chmod(path, 0o600)
  atomic_write_text(path, "new")
  assert path.read_text() == "new" and _mode(path) == 0o600
  os.chmod(path, 0o664)
  atomic_write_bytes(path, b"newer")
  assert _mode(path) == 0o664


def test_atomic_file_commit_and_abort(tmp_path):
  path = tmp_path / "t.jsonl"
  out = AtomicFile(path, "wb")
  out.file.write(b"1\n")
  out.file.write(b"2\n")
  assert not path.exists()
  out.commit()
  assert path.read_bytes() == b"1\n2\n" and out.file is None
  with pytest.raises(ValueError, match="already finished"):
    out.commit()
  out.abort()  # A no-op once committed.
  assert path.read_bytes() == b"1\n2\n"

  out = AtomicFile(path)
  out.file.write("discarded")
  out.abort()
  out.abort()
  assert path.read_bytes() == b"1\n2\n" and os.listdir(tmp_path) == ["t.jsonl"]
  with pytest.raises(ValueError, match="already finished"):
    out.commit()


def test_dropped_atomic_file_leaves_no_temp(tmp_path):
  out = AtomicFile(tmp_path / "x")
  out.file.write("never committed")
  del out
  gc.collect()
  assert os.listdir(tmp_path) == []


def _fill(files):
  def write(folder):
    os.makedirs(folder)
    for name, text in files.items():
      with open(os.path.join(folder, name), "w") as f:
        f.write(text)
  return write


def test_replace_folder_replaces_a_folder_only_once_it_is_written(tmp_path):
  out = tmp_path / "model"
  assert replace_folder(out, _fill({"a": "1", "b": "2"})) == str(out)
  assert sorted(os.listdir(out)) == ["a", "b"]
  os.makedirs(str(out) + ".tmp")  # A killed earlier write's leftover.
  (tmp_path / "model.tmp" / "stale").write_text("x")
  replace_folder(out, _fill({"c": "3"}))
  assert os.listdir(out) == ["c"] and sorted(os.listdir(tmp_path)) == ["model"]

  def fail(folder):
    _fill({"d": "4"})(folder)
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    replace_folder(out, fail)
  assert os.listdir(out) == ["c"]  # The old folder stays until a write succeeds.
