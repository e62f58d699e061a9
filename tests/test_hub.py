"""oel_jax.hub: hub ids resolved offline from a cache laid out as huggingface_hub lays it out.

The cache is built by hand (blobs named by their etag, snapshots of symlinks into blobs/, refs
holding commit hashes) from the tiny model's checkpoints, and huggingface_hub's own cache scanner
is asked to read it back, so the layout is the library's and not our idea of it.
"""

import hashlib
import json
import logging
import os
import shutil
import struct

import huggingface_hub
import jax.numpy as jnp
import numpy as np
import pytest

from hub_cache import add_snapshot
from oel_jax import config as config_lib
from oel_jax import hub, loop, tiny
from oel_jax.models import load_hf, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "tiny-org/tiny-qwen3"
# Commits as huggingface_hub names them (40 hex digits); any such string will do.
MAIN = hashlib.sha1(b"main").hexdigest()
V2 = hashlib.sha1(b"v2").hexdigest()
PARTIAL = hashlib.sha1(b"partial").hexdigest()
LISTED = hashlib.sha1(b"listed").hexdigest()
IDS = jnp.asarray([[1, 7, 42, 300, 5, 9]])


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
  """``HF_HOME`` with a cache at ``hub/``: REPO's main (the tiny model, one file), v2 (another
  seed, sharded with an index, also reachable by ``refs/pr/1``) and a partial download."""
  root = tmp_path_factory.mktemp("hub")
  sources = {"main": str(root / "src_main"), "v2": str(root / "src_v2")}
  tiny.write_tiny_checkpoint(sources["main"])
  save_hf(tiny.tiny_model(seed=1), sources["v2"], tokenizer=tiny.load_tiny_tokenizer(),
          max_shard_bytes=6_000_000)
  assert "model.safetensors.index.json" in os.listdir(sources["v2"])
  cache = str(root / "hf_home" / "hub")
  add_snapshot(cache, REPO, MAIN, sources["main"], refs=["main"])
  add_snapshot(cache, REPO, V2, sources["v2"], refs=["v2", "refs/pr/1"])
  add_snapshot(cache, REPO, PARTIAL, sources["main"], refs=["partial"], only={"config.json"})
  # An interrupted download as huggingface_hub >= 2 leaves it: the commit's file listing
  # (trees/<commit>.json, written with the library's own private writer) beside a snapshot
  # that lacks some of the files. The layout test checks that the library reads it back.
  add_snapshot(cache, REPO, LISTED, sources["main"], refs=["listed"], only={"config.json"})
  try:
    from huggingface_hub import _tree_cache  # pylint: disable=import-outside-toplevel
  except ImportError:  # huggingface_hub < 2 keeps no listing: that case is not built
    _tree_cache = None
  if _tree_cache is not None:
    _tree_cache.write_tree_cache(os.path.join(cache, "models--tiny-org--tiny-qwen3"), LISTED, {
        name: _tree_cache.TreeCacheEntry(
            size=os.path.getsize(os.path.join(sources["main"], name)),
            blob_id=hashlib.sha1(name.encode()).hexdigest())
        for name in os.listdir(sources["main"])})
  return {"home": str(root / "hf_home"), "cache": cache, "listed": _tree_cache is not None,
          **sources}


@pytest.fixture
def offline(hf_home, monkeypatch):
  """The cache above as huggingface_hub's, offline."""
  monkeypatch.setenv("HF_HUB_CACHE", hf_home["cache"])
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return hf_home


def _snapshot(hf_home, commit):
  return os.path.join(hf_home["cache"], "models--tiny-org--tiny-qwen3", "snapshots", commit)


def _logits(path):
  return np.asarray(load_hf(path)(IDS))


def test_the_cache_reads_back_through_huggingface_hub(hf_home):
  info = huggingface_hub.scan_cache_dir(hf_home["cache"])
  assert not info.warnings, info.warnings
  (repo,) = info.repos
  assert (repo.repo_id, repo.repo_type) == (REPO, "model")
  refs = {r.commit_hash: set(r.refs) for r in repo.revisions}
  assert refs == {MAIN: {"main"}, V2: {"v2", "refs/pr/1"}, PARTIAL: {"partial"},
                  LISTED: {"listed"}}
  if hf_home["listed"]:
    listed = huggingface_hub.get_cached_repo_tree(REPO, revision="listed",
                                                  cache_dir=hf_home["cache"])
    assert "model.safetensors" in {f.path for f in listed}
  for revision, commit in ((None, MAIN), ("v2", V2), (V2, V2)):
    assert huggingface_hub.try_to_load_from_cache(
        REPO, "config.json", cache_dir=hf_home["cache"], revision=revision) == \
        os.path.join(_snapshot(hf_home, commit), "config.json")


def test_hub_ids_resolve_to_their_snapshots_and_load_as_the_directories(offline, monkeypatch):
  main, v2 = _snapshot(offline, MAIN), _snapshot(offline, V2)
  assert hub.resolve_model(REPO) == main
  for revision in ("v2", V2, "refs/pr/1"):
    assert hub.resolve_model(f"{REPO}@{revision}") == v2
  assert hub.resolve_model(f"{REPO}@{MAIN}") == main
  np.testing.assert_array_equal(_logits(main), _logits(offline["main"]))
  np.testing.assert_array_equal(_logits(v2), _logits(offline["v2"]))
  assert not np.allclose(_logits(main), _logits(v2))  # the revision chose other weights
  # HF_HOME alone names the same cache (its hub/ folder), as huggingface_hub reads it.
  monkeypatch.delenv("HF_HUB_CACHE")
  monkeypatch.setenv("HF_HOME", offline["home"])
  assert hub.resolve_model(f"{REPO}@v2") == v2


@pytest.mark.parametrize("spec, reason", [
    ("tiny-org/absent", "the cache holds no revision of it (no models--tiny-org--absent/)"),
    (f"{REPO}@nope", "it holds no ref 'nope' (refs: listed, main, partial, refs/pr/1, v2;"),
    (f"{REPO}@{'0' * 40}", f"it holds no snapshot of commit {'0' * 40}"),
    (f"{REPO}@partial", "lacks model.safetensors (or model.safetensors.index.json"),
    (f"{REPO}@listed", f"The cached snapshot for '{REPO}' (revision 'listed', commit {LISTED}) "
                       "is incomplete"),
])
def test_what_the_cache_lacks_is_named_with_how_to_fill_it(offline, spec, reason):
  if spec.endswith("@listed") and not offline["listed"]:
    pytest.skip("this huggingface_hub keeps no file listing of a commit")
  with pytest.raises(hub.ModelNotFoundError) as e:
    hub.resolve_model(spec)
  message = str(e.value)
  repo, _, revision = spec.partition("@")
  revision = revision or "main"
  assert message.startswith(f"{spec!r} is not a directory here, and hub id {repo} "
                            f"(revision {revision}) could not be resolved in the Hugging Face "
                            f"cache {offline['cache']} (HF_HUB_OFFLINE=1: the cache only): ")
  assert reason in message
  assert f"`hf download {repo} --revision {revision} --cache-dir {offline['cache']}`" in message


def test_a_directory_passes_through_and_other_names_are_refused(offline, tmp_path, monkeypatch):
  assert hub.resolve_model(offline["main"]) == offline["main"]
  # A directory wins over a hub id of the same spelling (a relative path such as ckpt/model).
  os.makedirs(tmp_path / REPO)
  monkeypatch.chdir(tmp_path)
  assert hub.resolve_model(REPO) == REPO
  for spec in ("/nonexistent/Qwen3-4B", "runs/x/round_000/model", "./Qwen3", "a/b@"):
    with pytest.raises(hub.ModelNotFoundError, match="is neither a checkpoint directory nor a "
                       r"hub id \(owner/name or owner/name@revision"):
      hub.resolve_model(spec)
  assert hub.parse_hub_id("Qwen/Qwen3-8B") == hub.HubId("Qwen/Qwen3-8B")
  assert hub.parse_hub_id("Qwen/Qwen3-8B@refs/pr/3") == hub.HubId("Qwen/Qwen3-8B", "refs/pr/3")
  for spec in ("tiny", "Qwen3-8B", "/ckpt/Qwen3-8B", "a/b/c", "a--b/c", "owner/na..me"):
    assert hub.parse_hub_id(spec) is None, spec


def test_index_digest_names_the_checkpoint_not_its_layout(offline, tmp_path):
  main = _snapshot(offline, MAIN)
  digest = hub.index_digest(main)
  # A plain copy (no symlinks, as on a shared filesystem) of the same files: the same digest.
  copy = str(tmp_path / "copy")
  shutil.copytree(main, copy)
  assert not os.path.islink(os.path.join(copy, "config.json"))
  assert hub.index_digest(copy) == digest
  assert hub.index_digest(offline["main"]) == digest
  # Files a run does not read do not count.
  with open(os.path.join(copy, "README.md"), "w", encoding="utf-8") as f:
    f.write("notes")
  assert hub.index_digest(copy) == digest
  assert hub.index_digest(_snapshot(offline, V2)) != digest
  # Same architecture, same headers and sizes, other weights (another seed): the sampled data
  # blocks tell them apart.
  other = str(tmp_path / "seed1")
  save_hf(tiny.tiny_model(seed=1), other, tokenizer=tiny.load_tiny_tokenizer())
  assert os.path.getsize(os.path.join(other, "model.safetensors")) == \
      os.path.getsize(os.path.join(main, "model.safetensors"))
  assert hub.index_digest(other) != digest
  with open(os.path.join(copy, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config["rope_theta"] = 10_000.0
  with open(os.path.join(copy, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  assert hub.index_digest(copy) != digest
  with pytest.raises(hub.ModelNotFoundError, match="is not a checkpoint directory"):
    hub.index_digest(str(tmp_path / "absent"))


def _add_to_element(file, key, byte):
  """Adds 1 to the float32 element of tensor ``key`` that holds its byte ``byte`` (-1: the last),
  in place."""
  with open(file, "r+b") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    begin, end = json.loads(f.read(length))[key]["data_offsets"]
    f.seek(8 + length + begin + (byte % (end - begin)) // 4 * 4)
    value = np.frombuffer(f.read(4), np.float32) + 1
    f.seek(-4, os.SEEK_CUR)
    f.write(value.tobytes())
  return end - begin


@pytest.mark.parametrize("key, byte, seen", [
    # A small tensor is hashed whole: any element.
    ("model.layers.1.self_attn.q_norm.weight", 60, True),
    # A large one (the 2 MB embedding) by blocks from its first byte to its last.
    ("model.embed_tokens.weight", 0, True),
    ("model.embed_tokens.weight", -1, True),
    # What it does not see: a few elements of a large tensor away from the blocks (the digest
    # names which checkpoint a host holds; it does not check its integrity).
    ("model.embed_tokens.weight", 200_000, False),
])
def test_index_digest_samples_every_tensor(offline, tmp_path, key, byte, seen):
  copy = str(tmp_path / "copy")
  shutil.copytree(offline["main"], copy)
  digest = hub.index_digest(copy)
  nbytes = _add_to_element(os.path.join(copy, "model.safetensors"), key, byte)
  assert (nbytes <= hub._WHOLE_TENSOR) == key.endswith("norm.weight")
  assert (hub.index_digest(copy) != digest) == seen


def test_the_config_takes_a_hub_id_and_records_it(offline, tmp_path, caplog, monkeypatch):
  """The path main takes: plan validates and resolves, the pool loads from the snapshot, the
  workdir records the id as given and a resumed run with the same id matches it."""
  spec = f"{REPO}@v2"
  c = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
  c.model = spec
  c.extraction.model = REPO
  with caplog.at_level(logging.INFO, logger="oel_jax.hub"):
    run = loop.OnlineLoop(c, str(tmp_path / "run"), num_devices=1)
  assert run.plan.model_dirs == {spec: _snapshot(offline, V2), REPO: _snapshot(offline, MAIN)}
  assert run.plan.model_vocab_size == tiny.tiny_config().vocab_size
  assert f"resolved to {_snapshot(offline, V2)}" in caplog.text
  assert run.config.model == spec
  checked = []  # what the pool has the processes compare, once, before the first read
  monkeypatch.setattr(hub, "check_same_files", checked.append)
  np.testing.assert_array_equal(np.asarray(run.load_model(run.deployed_path(0))(IDS)),
                                _logits(offline["v2"]))
  assert len(run.tokenizer()) == tiny.TOKENIZER_LEN
  assert len(run.pool.tokenizer(run.config.extraction.model)) == tiny.TOKENIZER_LEN
  assert checked == [{f"config.model {spec!r}": _snapshot(offline, V2),
                      f"config.extraction.model {REPO!r}": _snapshot(offline, MAIN)}]
  run.check_workdir()
  with open(os.path.join(run.workdir, loop.CONFIG_FILE), encoding="utf-8") as f:
    recorded = json.load(f)
  assert recorded["model"] == spec and recorded["extraction"]["model"] == REPO
  loop.OnlineLoop(c, run.workdir, num_devices=1).check_workdir()  # resumes: same config

  c.model = "tiny-org/absent"
  c.extraction.model = f"{REPO}@nope"
  with pytest.raises(loop.ConfigError) as e:
    loop.plan(c, num_devices=1)
  message = str(e.value)
  assert "config.model: 'tiny-org/absent' is not a directory here, and hub id tiny-org/absent " \
         "(revision main) could not be resolved" in message
  assert "config.extraction.model: 'tiny-org/tiny-qwen3@nope' is not a directory here" in message
  c.model = "/nonexistent/Qwen3-4B"
  with pytest.raises(loop.ConfigError, match="config.model: '/nonexistent/Qwen3-4B' is neither "
                     "'tiny' nor a checkpoint directory nor a hub id"):
    loop.plan(c, num_devices=1)
