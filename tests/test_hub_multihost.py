"""Two processes x 2 CPU devices, each resolving the config's models into its own cache.

Before anything is loaded the processes compare what they resolved (`oel_jax.hub.
check_same_files`, run by the model pool): the same files on both and they go on, and each
process then reads only its own devices' parts of every tensor; files that differ by one tensor
value or one file and both stop with an error naming the model, each process's digest and the
directory each read. One job of two fresh interpreters runs every case in turn (a failed check
leaves both processes in step), so the test pays for starting a job once.
"""

import hashlib
import json
import os
import sys
import textwrap

import numpy as np

from hub_cache import add_snapshot, write_random_checkpoint
from processes import finish, free_port, spawn
from oel_jax.models import Qwen3Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, EXTRACTOR = "tiny-org/model", "tiny-org/extractor"
# The embedding (2,048 x 64 float32, 512 KiB) is sampled by the digest, the rest hashed whole.
CONFIG = Qwen3Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
CASES = ("same", "one value", "one file")

_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from flax import nnx
    from oel_jax import config as config_lib, distributed, hub, loop
    from oel_jax.model_pool import ModelPool
    from oel_jax.models import load_hf, safetensors_io

    address, index, caches, model, extractor = (sys.argv[1], int(sys.argv[2]),
                                                json.loads(sys.argv[3]), sys.argv[4], sys.argv[5])
    distributed.start(address, 2, index, timeout_s=60)
    reads = []
    read = safetensors_io.SafetensorsFile.read
    def counted(self, key, box=None):
      part = read(self, key, box)
      reads.append(part.nbytes)
      return part
    safetensors_io.SafetensorsFile.read = counted

    for case, cache in caches:
      os.environ["HF_HUB_CACHE"] = cache
      c = config_lib.load_config_file(os.path.join(os.getcwd(), "configs", "tiny.py"))
      c.model, c.extraction.model = model, (extractor if case == "one file" else "")
      c.mesh.data, c.mesh.fsdp, c.mesh.tp = 1, 2, 2  # fsdp across the processes, tp within
      plan = loop.plan(c)
      pool = ModelPool(plan.config, plan.mesh_shape, plan.model_dirs)
      out = {"case": case, "dir": plan.model_dirs[model], "error": None}
      try:
        pool.local(model)
      except hub.DifferentFilesError as e:
        out["error"] = str(e)
      if case == "same":
        reads.clear()
        mine = dict(nnx.to_flat_state(nnx.state(pool.load(model), nnx.Param)))
        out["bytes_read"] = sum(reads)
        whole = dict(nnx.to_flat_state(nnx.state(load_hf(pool.local(model)), nnx.Param)))
        out["shards_equal"] = all(
            np.array_equal(np.asarray(s.data), np.asarray(whole[k].get_value())[s.index])
            for k, v in mine.items() for s in v.get_value().addressable_shards)
        out["shards"] = sum(len(v.get_value().addressable_shards) for v in mine.values())
      print("RESULT", json.dumps(out), flush=True)
""")


def _commit(name: str) -> str:
  return hashlib.sha1(name.encode()).hexdigest()


def _caches(root: str) -> list[list[tuple[str, str]]]:
  """Each process's cache for each case: [process][case] -> (case, cache)."""
  files = {"chat_template.jinja": "{{ messages }}"}
  base = write_random_checkpoint(os.path.join(root, "base"), CONFIG, extra_files=files)
  # One value of one tensor differs, as if "main" had moved between the two hosts' downloads.
  edited = os.path.join(root, "edited")
  write_random_checkpoint(edited, CONFIG, extra_files=files)
  with open(os.path.join(edited, "model.safetensors"), "r+b") as f:
    f.seek(-4, os.SEEK_END)  # the last value of the last tensor, layers.1.mlp.down_proj
    f.write(np.float32(1).tobytes())
  # One file differs: the extractor's chat template.
  other_template = write_random_checkpoint(os.path.join(root, "template"), CONFIG,
                                           extra_files={"chat_template.jinja": "{{ other }}"})
  caches = [[], []]
  for case in CASES:
    for process in (0, 1):
      cache = os.path.join(root, "caches", f"{case}-{process}".replace(" ", "_"))
      model = edited if case == "one value" and process == 1 else base
      commit = _commit(f"{case}-{process}" if model == edited else "base")
      add_snapshot(cache, MODEL, commit, model, refs=["main"])
      extractor = other_template if process == 1 else base
      add_snapshot(cache, EXTRACTOR, _commit(extractor), extractor, refs=["main"])
      caches[process].append((case, cache))
  return caches


def test_processes_compare_the_files_they_resolved_before_loading(tmp_path):
  caches = _caches(str(tmp_path))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
             HF_HUB_OFFLINE="1")
  address = f"127.0.0.1:{free_port()}"
  workers = spawn([[sys.executable, "-c", _WORKER, address, str(i), json.dumps(caches[i]), MODEL,
                    EXTRACTOR] for i in (0, 1)], cwd=ROOT, env=env)
  results = []
  for done in finish(workers, timeout=300):
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [l.split(" ", 1)[1] for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    results.append({r["case"]: r for r in map(json.loads, lines)})

  for i, got in enumerate(results):
    same, value, file = (got[case] for case in CASES)
    # The same files: no error, and each process read about half the weights (its fsdp half of
    # every matrix, and the 1 KB norm scales whole), its parts equal to the whole load's.
    assert same["error"] is None
    assert same["shards_equal"] and same["shards"] > 0
    total = os.path.getsize(os.path.join(str(tmp_path), "base", "model.safetensors"))
    assert 0.45 * total < same["bytes_read"] < 0.55 * total, (same["bytes_read"], total)
    # One value differs: both stop, naming the model, each process's digest and where this
    # process read it.
    message = value["error"]
    assert message is not None, f"process {i} went on with different weights"
    assert f"process {i} of 2" in message
    assert f"files of config.model {MODEL!r} differs" in message
    digests = [message.split(f"process {p}: ")[1][:12] for p in (0, 1)]
    assert digests[0] != digests[1]
    assert f"config.model {MODEL!r} is {value['dir']} (digest {digests[i]})" in message
    assert "pin a commit" in message
    # One file of the extractor differs: the extractor is named, not the model.
    message = file["error"]
    assert message is not None and f"files of config.extraction.model {EXTRACTOR!r} differs" \
        in message
    assert f"files of config.model {MODEL!r} differs" not in message
  assert results[0]["one value"]["dir"] != results[1]["one value"]["dir"]
