"""A huggingface_hub cache built by hand, as the library lays it out, for tests that resolve hub
ids offline: blobs named by their etag, snapshots of symlinks into blobs/, refs holding commit
hashes."""

import hashlib
import os


def add_snapshot(cache, repo, commit, source, refs=(), only=None):
  """Adds ``source``'s files to ``cache`` as huggingface_hub stores a download of ``commit``."""
  storage = os.path.join(cache, "models--" + repo.replace("/", "--"))
  snapshot = os.path.join(storage, "snapshots", commit)
  os.makedirs(snapshot)
  os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
  for name in sorted(os.listdir(source)):
    if only is not None and name not in only:
      continue
    with open(os.path.join(source, name), "rb") as f:
      data = f.read()
    # A blob is named by its etag: the sha256 of an LFS file (the weights), the git blob sha1
    # of any other file.
    if name.endswith(".safetensors"):
      etag = hashlib.sha256(data).hexdigest()
    else:
      etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    blob = os.path.join(storage, "blobs", etag)
    if not os.path.exists(blob):
      with open(blob, "wb") as f:
        f.write(data)
    os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
  for ref in refs:
    path = os.path.join(storage, "refs", ref)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(commit)  # no newline, as huggingface_hub writes a ref


def write_random_checkpoint(path, config, seed=0, dtype="float32", extra_files=None):
  """Writes a Hugging Face checkpoint of ``config`` (a `Qwen3Config`) with random weights
  straight from NumPy (no model is built: fast at any size), one tensor at a time, plus
  ``extra_files`` (name -> text)."""
  # Imported here: a test that only lays out a cache needs none of this.
  import json  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from oel_jax.models import safetensors_io  # pylint: disable=import-outside-toplevel
  from oel_jax.models.hf import tensor_mappings  # pylint: disable=import-outside-toplevel

  os.makedirs(path, exist_ok=True)
  mappings = tensor_mappings(config)
  specs = {m.hf_key: (m.hf_shape, np.dtype(dtype)) for m in mappings}

  def fetch(key):
    rng = np.random.default_rng([seed, sorted(specs).index(key)])
    return rng.standard_normal(specs[key][0], np.float32).astype(dtype)

  safetensors_io.write(os.path.join(path, "model.safetensors"), specs, fetch)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_hf(), f)
  for name, text in (extra_files or {}).items():
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
      f.write(text)
  return os.fspath(path)
