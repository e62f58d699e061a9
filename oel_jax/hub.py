"""Checkpoints named by a Hugging Face hub id, resolved into huggingface_hub's cache.

    resolve_model("/ckpt/Qwen3-8B")          # a directory: returned unchanged
    resolve_model("Qwen/Qwen3-8B")           # main's snapshot: .../models--Qwen--Qwen3-8B/snapshots/<commit>
    resolve_model("Qwen/Qwen3-8B@v1.0")      # a branch or tag; a 40-hex commit hash works too
    index_digest(directory)                  # what the processes of one run compare
    check_same_files({"config.model 'Qwen/Qwen3-8B'": directory})  # every process, before loading

``config.model`` and ``config.extraction.model`` take a checkpoint directory or a hub id
``owner/name[@revision]``. A hub id is resolved with `huggingface_hub.snapshot_download` into the
cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), fetching only
the files a run reads (`CHECKPOINT_FILES`: the config, the safetensors weights and their index,
the tokenizer and the chat template). With ``HF_HUB_OFFLINE=1`` nothing is fetched: the cache
must hold them, and `ModelNotFoundError` names the id, the revision, the cache and how to fill it
when it does not.

The environment is read at each call rather than taken from huggingface_hub's constants, which the
library fixes when it is imported: a notebook or test that sets ``HF_HUB_CACHE`` or
``HF_HUB_OFFLINE`` after importing it gets what it set.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Mapping

import jax

from oel_jax import distributed
from oel_jax.errors import InputError, one_line

_log = logging.getLogger(__name__)

# What `oel_jax.models.load_hf` and the tokenizer read from a checkpoint directory; nothing else
# of a repository (PyTorch .bin copies, GGUF files, README, original/ folders) is downloaded.
CHECKPOINT_FILES = (
    "config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# huggingface_hub's patterns match across "/" (fnmatch), so "*.safetensors" alone would also take
# a repository's sub-folders; load_hf reads the top level only.
_SUBFOLDERS = ("*/*",)

# What huggingface_hub accepts as true in its environment variables (constants._is_true).
_TRUE = {"1", "ON", "YES", "TRUE"}
# An owner and a name of letters, digits, "-", "_" and "."; huggingface_hub's own validator runs
# after this (it also refuses "--" and "..").
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# What `index_digest` reads of each tensor: the whole of one up to `_WHOLE_TENSOR` bytes, else
# `_SAMPLES` blocks of `_SAMPLE_BYTES` spread evenly from its first byte to its last. About
# 256 KiB a tensor whatever the model's size: Qwen3-8B's 399 tensors cost ~70 MB of reads.
_WHOLE_TENSOR = 1 << 18
_SAMPLES, _SAMPLE_BYTES = 4, 1 << 16


class ModelNotFoundError(InputError):
  """A model spec that is neither a directory nor a hub id that can be resolved (the message
  names the id, the revision, the cache and how to fill it)."""


@dataclasses.dataclass(frozen=True)
class HubId:
  """A hub id as written in a config: ``owner/name`` and an optional ``@revision``."""

  repo_id: str
  """``owner/name``."""
  revision: str | None = None
  """A branch, a tag or a commit hash; None: the repository's default branch ("main")."""

  def __str__(self) -> str:
    return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(spec: str) -> HubId | None:
  """``spec`` as a hub id, or None when it cannot be one (an absolute or ``./`` path, more than
  one "/" before any "@", characters a repository name cannot hold)."""
  repo_id, at, revision = spec.partition("@")
  if not _HUB_ID.fullmatch(repo_id) or (at and not revision):
    return None
  # Imported here: only hub ids need huggingface_hub, and plain directories stay as cheap as
  # before.
  from huggingface_hub.utils import HFValidationError, validate_repo_id  # pylint: disable=import-outside-toplevel
  try:
    validate_repo_id(repo_id)
  except HFValidationError:
    return None
  return HubId(repo_id, revision or None)


def cache_dir() -> str:
  """huggingface_hub's cache folder as the environment names it now: ``HF_HUB_CACHE`` (or the
  legacy ``HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
  ``$XDG_CACHE_HOME/huggingface/hub`` (default ``~/.cache/huggingface/hub``)."""
  env = os.environ
  path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
  if not path:
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    path = os.path.join(home, "hub")
  return os.path.expandvars(os.path.expanduser(path))


def offline() -> bool:
  """Whether nothing may be downloaded: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set
  now, or was when huggingface_hub was imported (its HTTP calls then refuse anyway)."""
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
  value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
  return value.upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def resolve_model(spec: str) -> str:
  """The checkpoint directory ``spec`` names.

  Args:
    spec: a directory (returned unchanged: `oel_jax.models.check_hf` judges its contents), or a
      hub id ``owner/name`` with an optional ``@revision`` (branch, tag or 40-hex commit hash).

  Returns:
    The directory; for a hub id, its snapshot in the cache,
    ``<cache>/models--owner--name/snapshots/<commit>``, holding `CHECKPOINT_FILES`.

  Raises:
    ModelNotFoundError: ``spec`` is neither a directory nor a hub id; or the id cannot be
      resolved (offline and not in the cache, not on the Hub, a revision that does not exist);
      or its snapshot lacks ``config.json`` or a safetensors file the weights need.
  """
  spec = os.fspath(spec)
  if os.path.isdir(spec):
    return spec
  hub = parse_hub_id(spec)
  if hub is None:
    raise ModelNotFoundError(
        f"{spec!r} is neither a checkpoint directory nor a hub id (owner/name or "
        "owner/name@revision, e.g. Qwen/Qwen3-4B)")
  # Imported here: huggingface_hub pulls in its HTTP stack, which directories never need.
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  from huggingface_hub import utils as hub_utils  # pylint: disable=import-outside-toplevel
  # huggingface_hub >= 2 names a snapshot whose cached file listing shows missing files; older
  # versions return such a snapshot, and `_missing_files` below catches what it lacks.
  incomplete = getattr(getattr(huggingface_hub, "errors", None), "IncompleteSnapshotError", ())

  cache, is_offline = cache_dir(), offline()
  revision = hub.revision or "main"
  try:
    directory = huggingface_hub.snapshot_download(
        hub.repo_id, revision=revision, cache_dir=cache, local_files_only=is_offline,
        allow_patterns=list(CHECKPOINT_FILES), ignore_patterns=list(_SUBFOLDERS))
  except (hub_utils.HfHubHTTPError, hub_utils.EntryNotFoundError,
          hub_utils.OfflineModeIsEnabled, hub_utils.HFValidationError, OSError) as e:
    if isinstance(e, hub_utils.LocalEntryNotFoundError) and not isinstance(e, incomplete):
      # The library's message is generic here; what the cache does hold says more.
      reason = _cache_state(cache, hub.repo_id, revision, e)
      if not is_offline:  # The Hub was unreachable: say why as well.
        reason += f" (and the Hub: {one_line(e)})"
    else:  # An incomplete snapshot (the files are listed), or the Hub's own answer.
      reason = one_line(e)
    raise ModelNotFoundError(_not_found(spec, hub, revision, cache, is_offline, reason)) from e
  missing = _missing_files(directory)
  if missing:
    reason = (f"its snapshot {directory} lacks {', '.join(missing)}"
              + ("" if is_offline else " (the repository holds no such file at this revision: "
                 "only safetensors checkpoints load)"))
    raise ModelNotFoundError(_not_found(spec, hub, revision, cache, is_offline, reason))
  _log.info("hub id %s (revision %s) resolved to %s", hub.repo_id, revision, directory)
  return directory


def _not_found(spec: str, hub: HubId, revision: str, cache: str, is_offline: bool,
               reason: str) -> str:
  fill = (f"fill the cache where the Hub is reachable (`hf download {hub.repo_id} "
          f"--revision {revision} --cache-dir {cache}`"
          + (", or this run once without HF_HUB_OFFLINE=1" if is_offline else "")
          + "), point HF_HUB_CACHE or HF_HOME at a cache that holds it, or pass a checkpoint "
          "directory")
  mode = "HF_HUB_OFFLINE=1: the cache only" if is_offline else "online"
  # "not a directory" too: a relative path mistyped looks like a hub id.
  return (f"{spec!r} is not a directory here, and hub id {hub.repo_id} (revision {revision}) could not be resolved in the "
          f"Hugging Face cache {cache} ({mode}): {reason}; {fill}")


def _cache_state(cache: str, repo_id: str, revision: str, error: Exception) -> str:
  """What the cache holds of ``repo_id``, to say why ``revision`` was not found there."""
  storage = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  if not os.path.isdir(storage):
    return f"the cache holds no revision of it (no {os.path.basename(storage)}/)"
  refs_dir = os.path.join(storage, "refs")
  refs = sorted(os.path.relpath(os.path.join(root, f), refs_dir).replace(os.sep, "/")
                for root, _, files in os.walk(refs_dir) for f in files)
  snapshots_dir = os.path.join(storage, "snapshots")
  commits = sorted(os.listdir(snapshots_dir)) if os.path.isdir(snapshots_dir) else []
  if _COMMIT.fullmatch(revision) or revision in refs:
    commit = revision
    if not _COMMIT.fullmatch(revision):
      with open(os.path.join(refs_dir, revision), encoding="utf-8") as f:
        commit = f.read().strip()
    if commit not in commits:
      return (f"it holds no snapshot of commit {commit} (snapshots: "
              f"{', '.join(commits) or 'none'})")
    return f"huggingface_hub did not find it there ({one_line(error)})"
  return (f"it holds no ref {revision!r} (refs: {', '.join(refs) or 'none'}; snapshots: "
          f"{', '.join(commits) or 'none'})")


def _missing_files(directory: str) -> list[str]:
  """The files ``directory`` needs to load and lacks: config.json, and model.safetensors or
  the index with every shard it names. An unreadable index is left to `check_hf` to report."""
  missing = [] if os.path.isfile(os.path.join(directory, "config.json")) else ["config.json"]
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
      return missing
    missing += [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
  elif not os.path.isfile(os.path.join(directory, "model.safetensors")):
    missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
  return missing


def index_digest(directory: str | os.PathLike) -> str:
  """A sha256 naming the checkpoint in ``directory``, cheap to compute on every host.

  A multi-process run resolves ``config.model`` on every host (each into its own cache, or all
  from one shared directory), computes this digest of what it got, and compares the digests
  across processes (`check_same_files`) before loading, so that hosts which resolved a moving
  branch at different moments, or hold a partial or different copy, stop with an error instead
  of training on different weights.

  Covered: every top-level file of `CHECKPOINT_FILES` (weights, index, config, tokenizer, chat
  template) by name and size; the whole content of every file but the weights; of each
  safetensors file its header (every tensor's name, dtype, shape and offsets) and, of every
  tensor in it, all its bytes when it is small (norm scales; up to ``_WHOLE_TENSOR`` bytes),
  else ``_SAMPLES`` blocks of ``_SAMPLE_BYTES`` from its first byte to its last.

  Why samples, not every byte: hashing a 16 GB checkpoint whole costs each host a full read
  of it at every start (tens of seconds from a local disk, minutes and N times the traffic
  from a shared file system), while after `oel_jax.models.load_hf` each host reads only its
  own shards. Sampling every tensor costs about 256 KiB a tensor whatever the model's size, and
  still tells apart any two checkpoints that differ in a whole tensor: another revision, a
  fine-tune of any subset of the tensors (a fine-tune or a merged LoRA changes every element of
  a tensor it touches), a partial or truncated download (the sizes differ), another config or
  tokenizer. What it misses is an edit confined to a few elements of a large tensor away from
  the samples (a bit flip, a hand-edited embedding row): what is compared is which checkpoint
  a host holds, not its integrity. The hub's own content hashes (the names of the cache's
  blobs) would be exact and free, but exist only in a cache: a host reading a plain shared
  directory could not be compared with one reading its cache without hashing every byte.
  Nothing here depends on the layout: a cache snapshot (symlinks into ``blobs/``) and a plain
  copy of the same files give the same digest.

  Raises:
    ModelNotFoundError: ``directory`` is not a directory.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise ModelNotFoundError(f"index_digest: {directory!r} is not a checkpoint directory")
  digest = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if not os.path.isfile(path) or not any(fnmatch.fnmatchcase(name, p)
                                           for p in CHECKPOINT_FILES):
      continue
    size = os.path.getsize(path)
    content = hashlib.sha256()
    with open(path, "rb") as f:
      if name.endswith(".safetensors"):
        _hash_safetensors(f, size, content)
      else:
        for block in iter(lambda: f.read(1 << 20), b""):
          content.update(block)
    digest.update(json.dumps([name, size, content.hexdigest()]).encode() + b"\n")
  return digest.hexdigest()


class DifferentFilesError(distributed.DisagreementError):
  """The processes of one job hold different files for a model they are to load."""


def check_same_files(checkpoints: Mapping[str, str]) -> None:
  """Stops every process of the job unless all hold the same files for each checkpoint.

  Every process calls it at the same point of its control flow, before loading, with the same
  names: ``checkpoints`` maps what the user named (e.g. ``"config.model 'Qwen/Qwen3-8B'"``)
  to the directory it was resolved to on this host, which may differ from host to host (each
  its own cache). Each process computes `index_digest` of each directory, and
  `oel_jax.distributed.check_agreement` compares them. One process: nothing to compare, nothing
  read.

  Raises:
    DifferentFilesError: on every process, naming each checkpoint whose files differ, each
      process's digest of it, and the directory this process read.
  """
  if not checkpoints or not (jax.distributed.is_initialized() and jax.process_count() > 1):
    return
  digests = {}
  for name, directory in checkpoints.items():
    try:
      digests[f"files of {name}"] = index_digest(directory)
    except (OSError, InputError) as e:
      # Compared, not raised: a process that stopped here would leave the others waiting in
      # the comparison for ever.
      digests[f"files of {name}"] = f"unreadable ({one_line(e)})"
  try:
    distributed.check_agreement(digests)
  except distributed.DisagreementError as e:
    # Each process's digest of what it computed, as the message lists them.
    here = "; ".join(f"{name} is {directory} (digest "
                     f"{distributed.digest(digests[f'files of {name}'])[:12]})"
                     for name, directory in checkpoints.items())
    raise DifferentFilesError(
        f"{e} The files differ, not the command: on this process {here}. Every process must "
        "load the same checkpoint: pin a commit (owner/name@<40-hex commit>) so that each host "
        "resolves the same snapshot, or have every host read one shared directory, or copy "
        "the same files to each.") from None


def _hash_safetensors(f, size: int, content) -> None:
  """Feeds a safetensors file's header and each of its tensors' sampled bytes to ``content``."""
  head = f.read(8)
  content.update(head)
  if len(head) < 8:
    return
  # A header that overruns the file is hashed as far as it goes: the size already differs.
  header_end = min(8 + struct.unpack("<Q", head)[0], size)
  header = f.read(header_end - 8)
  content.update(header)
  try:
    spans = sorted({tuple(int(o) for o in entry["data_offsets"])
                    for key, entry in json.loads(header).items() if key != "__metadata__"})
  except (ValueError, TypeError, KeyError, AttributeError):
    return  # Not a header: hashed as bytes above, and `check_hf` names what is wrong.
  for begin, end in spans:
    length = end - begin
    if length <= _WHOLE_TENSOR:
      blocks = [(begin, length)]
    else:
      step = (length - _SAMPLE_BYTES) // (_SAMPLES - 1)
      blocks = [(begin + i * step, _SAMPLE_BYTES) for i in range(_SAMPLES)]
    for offset, length in blocks:
      f.seek(header_end + offset)
      content.update(f.read(length))
