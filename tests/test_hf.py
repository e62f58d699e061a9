"""Hugging Face checkpoint import/export: round trips, sharded files, bad checkpoints, meshes."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from hf_reference import hf_logits, make_hf_model, padded_batch
from oel_jax import parallel
from oel_jax.models import CheckpointError, Qwen3Config, load_hf, save_hf
from oel_jax.models import safetensors_io

# Head and MLP sizes divisible by every mesh axis used below (tp 2, fsdp 4 or 8).
SHAPE = dict(vocab=128, hidden=64, intermediate=96, layers=2, heads=8, kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for tied in (False, True):
    hf = make_hf_model(**SHAPE, tied=tied, theta=5e6, seed=int(tied))
    path = tmp_path_factory.mktemp(f"tied{tied}")
    hf.save_pretrained(path)
    out[tied] = (hf, path)
  return out


@pytest.mark.parametrize("tied", [False, True])
def test_load_save_reload_identical_tensors(checkpoints, tmp_path, tied):
  hf, path = checkpoints[tied]
  save_hf(load_hf(path), tmp_path)
  reloaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path)
  ref = hf.state_dict()
  got = reloaded.state_dict()
  assert set(ref) == set(got)
  for key in ref:
    assert torch.equal(ref[key], got[key]), key
  assert reloaded.config.tie_word_embeddings == tied
  assert reloaded.config.rope_parameters["rope_theta"] == 5e6


def test_export_is_readable_by_the_safetensors_library(checkpoints, tmp_path):
  _, path = checkpoints[False]
  model = load_hf(path)
  save_hf(model, tmp_path, dtype=jnp.bfloat16)
  theirs = safetensors.torch.load_file(os.path.join(tmp_path, "model.safetensors"))
  assert theirs["model.embed_tokens.weight"].dtype == torch.bfloat16
  want = np.asarray(model.embed[...].astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(theirs["model.embed_tokens.weight"].float().numpy(), want)
  assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"


def test_sharded_checkpoint_loads_like_single_file(checkpoints, tmp_path):
  hf, path = checkpoints[False]
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
  single, sharded = load_hf(path), load_hf(tmp_path / "sharded")
  a = jax.tree.leaves(nnx.state(single))
  b = jax.tree.leaves(nnx.state(sharded))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_our_sharded_export_round_trips(checkpoints, tmp_path):
  hf, path = checkpoints[True]
  save_hf(load_hf(path), tmp_path, max_shard_bytes=30_000)
  files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  assert len(files) > 2 and "model.safetensors" not in files
  reloaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path)
  for key, value in hf.state_dict().items():
    assert torch.equal(value, reloaded.state_dict()[key]), key
  # Reloading ours gives the same model again.
  again = load_hf(tmp_path)
  ids, mask = padded_batch([5, 3], 128, side="left")
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids), attention_mask=mask))[real],
                             hf_logits(hf, ids, mask)[real], atol=1e-4)


def test_reads_transformers_v4_config(checkpoints, tmp_path):
  _, path = checkpoints[False]
  shutil.copytree(path, tmp_path, dirs_exist_ok=True)
  config = json.load(open(tmp_path / "config.json"))
  theta = config.pop("rope_parameters")["rope_theta"]
  config["rope_theta"] = theta
  json.dump(config, open(tmp_path / "config.json", "w"))
  assert load_hf(tmp_path).config.rope_theta == 5e6


def test_tied_checkpoint_with_stored_head_loads(checkpoints, tmp_path):
  """Hub tied checkpoints (Qwen3-0.6B/1.7B) also store lm_head.weight; it is not needed."""
  _, path = checkpoints[True]
  shutil.copytree(path, tmp_path, dirs_exist_ok=True)
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors",
                              metadata={"format": "pt"})
  model = load_hf(tmp_path)
  assert not hasattr(model, "lm_head")


# ---- bad checkpoints: the error names the key or field and the file ----


def _copy(path, tmp_path):
  shutil.copytree(path, tmp_path, dirs_exist_ok=True)
  return tmp_path


def _rewrite(file, edit):
  tensors = safetensors.numpy.load_file(file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(checkpoints, tmp_path):
  path = _copy(checkpoints[False][1], tmp_path)
  _rewrite(path / "model.safetensors",
           lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn"
                     r"\.k_norm\.weight'.*config\.json"):
    load_hf(path)


def test_extra_tensor(checkpoints, tmp_path):
  path = _copy(checkpoints[False][1], tmp_path)
  _rewrite(path / "model.safetensors",
           lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(128, "f4")}))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor "
                     r"'model\.layers\.0\.self_attn\.q_proj\.bias'"):
    load_hf(path)


def test_wrong_shape(checkpoints, tmp_path):
  path = _copy(checkpoints[False][1], tmp_path)
  _rewrite(path / "model.safetensors",
           lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64), "f4")}))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                     r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(95, 64\), "
                     r"expected \(96, 64\)"):
    load_hf(path)


def test_truncated_file(checkpoints, tmp_path):
  path = _copy(checkpoints[False][1], tmp_path)
  file = path / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[: len(data) - 1000])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.+' "
                     r"ends at byte"):
    load_hf(path)
  file.write_bytes(data[:5])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
    load_hf(path)


def test_config_not_qwen3(checkpoints, tmp_path):
  path = _copy(checkpoints[False][1], tmp_path)
  config = json.load(open(path / "config.json"))
  config["model_type"] = "llama"
  json.dump(config, open(path / "config.json", "w"))
  with pytest.raises(ValueError, match=r"config\.json: field 'model_type' is 'llama'"):
    load_hf(path)
  config["model_type"] = "qwen3"
  del config["num_hidden_layers"]
  json.dump(config, open(path / "config.json", "w"))
  with pytest.raises(ValueError, match=r"config\.json: missing field\(s\) num_hidden_layers"):
    load_hf(path)


def test_no_weights(tmp_path):
  json.dump(transformers.Qwen3Config(vocab_size=8, hidden_size=8, intermediate_size=8,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, head_dim=4).to_dict(),
            open(tmp_path / "config.json", "w"))
  (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
  with pytest.raises(CheckpointError, match="only safetensors"):
    load_hf(tmp_path)


def test_index_pointing_at_missing_file(checkpoints, tmp_path):
  hf, _ = checkpoints[False]
  hf.save_pretrained(tmp_path, max_shard_size="40KB")
  victim = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
  os.unlink(tmp_path / victim)
  with pytest.raises(CheckpointError, match=f"mapped to {victim}, which is missing"):
    load_hf(tmp_path)


def test_failed_export_leaves_no_partial_file(checkpoints, tmp_path):
  model = load_hf(checkpoints[False][1])
  specs = {"a": ((2, 2), np.float32)}
  with pytest.raises(ValueError, match="tensor 'a'"):
    safetensors_io.write(tmp_path / "x.safetensors", specs, lambda k: np.zeros(3, "f4"))
  assert os.listdir(tmp_path) == []
  del model


# ---- meshes ----


@pytest.mark.parametrize("axes", [dict(data=1, fsdp=4, tp=2), dict(data=2, fsdp=4, tp=1)])
def test_load_onto_mesh_matches_single_device(checkpoints, axes):
  assert jax.device_count() == 8, "conftest.py sets 8 simulated CPU devices"
  hf, path = checkpoints[False]
  mesh = parallel.make_mesh(parallel.MeshConfig(**axes))
  model = load_hf(path, mesh=mesh)
  state = nnx.state(model, nnx.Param)
  for key, variable in nnx.to_flat_state(state):
    spec = P(*variable.get_metadata()["out_sharding"])
    array = variable.get_value()
    assert array.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), array.ndim), key
  q = model.layers[0].attn.q_proj[...]
  assert q.addressable_shards[0].data.shape == (64 // axes["fsdp"], 8 // axes["tp"], 16)

  ids, mask = padded_batch([7, 3, 5, 2, 6, 1, 4, 7], 128, side="left")
  forward = nnx.jit(lambda m, x, a: m(x, attention_mask=a))
  sharded = forward(model, jnp.asarray(ids), jnp.asarray(mask))
  single = load_hf(path)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(sharded)[real], np.asarray(single)[real], atol=1e-5)


def test_mesh_that_does_not_divide_names_the_parameter(checkpoints):
  _, path = checkpoints[False]
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=1, tp=8))
  # 2 kv heads cannot split over tp=8.
  with pytest.raises(ValueError, match=r"layers\.0\.attn\.k_proj: dimension 1 .* size 2.*tp"):
    load_hf(path, mesh=mesh)


# ---- loading onto a mesh reads each process's parts only ----


def _count_reads(monkeypatch) -> list[tuple[str, int]]:
  """Every tensor part read from a safetensors file from now on: (key, bytes)."""
  reads = []
  read = safetensors_io.SafetensorsFile.read

  def counted(self, key, box=None):
    part = read(self, key, box)
    reads.append((key, part.nbytes))
    return part

  monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", counted)
  return reads


def test_a_part_of_a_parameter_reads_its_part_of_the_tensor():
  """Any slices of our parameter, also ones no partition spec makes (a head's half of
  head_dim, strided), equal the same slices of the whole tensor transposed and reshaped."""
  from oel_jax.models.hf import tensor_mappings  # pylint: disable=import-outside-toplevel
  config = Qwen3Config(vocab_size=24, hidden_size=12, intermediate_size=20, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=6, tie_word_embeddings=False)
  mappings = {m.hf_key.replace("model.layers.0.", ""): m for m in tensor_mappings(config)}
  rng = np.random.default_rng(0)

  class File:  # a safetensors file that holds one tensor, read as the real one is
    def __init__(self, array):
      self.array = array

    def read(self, key, box=None):
      return self.array if box is None else self.array[tuple(slice(*b) for b in box)]

  slicings = [(), (slice(0, 6),), (slice(3, 9), slice(1, 3)),
              (slice(None), slice(1, 4), slice(2, 5)), (slice(1, 12, 2), slice(0, 4, 3))]
  for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight",
               "model.embed_tokens.weight", "self_attn.k_norm.weight"):
    m = mappings[name]
    whole = rng.standard_normal(m.hf_shape).astype(np.float32)
    want = m.to_nnx(whole)
    for index in slicings:
      index = index[:len(m.nnx_shape)]
      np.testing.assert_array_equal(m.read(File(whole), index), want[index], err_msg=name)


@pytest.mark.parametrize("axes, dtype", [(dict(data=2, fsdp=2, tp=2), jnp.float32),
                                         (dict(data=1, fsdp=8, tp=1), jnp.bfloat16)])
def test_load_onto_mesh_is_bit_identical_and_reads_each_part_once(checkpoints, monkeypatch,
                                                                   axes, dtype):
  hf, path = checkpoints[False]
  single = dict(nnx.to_flat_state(nnx.state(load_hf(path, dtype=dtype), nnx.Param)))
  reads = _count_reads(monkeypatch)
  mesh = parallel.make_mesh(parallel.MeshConfig(**axes))
  sharded = dict(nnx.to_flat_state(nnx.state(load_hf(path, dtype=dtype, mesh=mesh), nnx.Param)))
  for key, variable in single.items():
    whole = np.asarray(variable.get_value())
    array = sharded[key].get_value()
    assert array.dtype == whole.dtype
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index], err_msg=str(key))
  # Each part is read once, replicas sharing it, so the parts add up to the checkpoint; and a
  # parameter split over fsdp x tp is read as that many parts, none of them whole.
  sizes = {k: v.numel() * v.element_size() for k, v in hf.state_dict().items()}
  assert sum(n for _, n in reads) == sum(sizes.values())
  parts = axes["fsdp"] * axes["tp"]
  for key, nbytes in reads:
    if key.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight")):
      assert nbytes == sizes[key] // parts, key
