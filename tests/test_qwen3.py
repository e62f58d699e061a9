"""Our Qwen3 against transformers' PyTorch Qwen3 (float32, random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import hf_logits, make_hf_model, padded_batch
from oel_jax import parallel
from oel_jax.models import KVCache, PRESETS, Qwen3Config, abstract_model, load_hf

# (tied, rope theta, query heads, kv heads): both thetas, tied and untied, GQA 1, 2, 4.
CASES = {
    "untied-theta1e6-gqa1": dict(tied=False, theta=1e6, heads=4, kv_heads=4),
    "tied-theta5e6-gqa2": dict(tied=True, theta=5e6, heads=4, kv_heads=2),
    "untied-theta5e6-gqa4": dict(tied=False, theta=5e6, heads=8, kv_heads=2),
    "tied-theta1e6-gqa4": dict(tied=True, theta=1e6, heads=8, kv_heads=2),
}
LENGTHS = [11, 4, 7, 1]  # mixed lengths, one single-token row


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
  hf = make_hf_model(**CASES[request.param], seed=len(request.param))
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  return hf, load_hf(path), path


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers(pair, side):
  hf, model, _ = pair
  ids, mask = padded_batch(LENGTHS, hf.config.vocab_size, side=side, seed=3)
  ref = hf_logits(hf, ids, mask)
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  scale = np.abs(ref[real]).max()
  assert scale > 1.0  # the weights are large enough that logits are far from flat
  err = np.abs(ours[real] - ref[real]).max()
  assert err <= 1e-4 * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"


def test_config_read_from_checkpoint(pair):
  hf, model, _ = pair
  c = model.config
  assert c.rope_theta == hf.config.rope_parameters["rope_theta"]
  assert c.tie_word_embeddings == hf.config.tie_word_embeddings
  assert (c.num_heads, c.num_kv_heads) == (hf.config.num_attention_heads,
                                           hf.config.num_key_value_heads)
  assert hasattr(model, "lm_head") != c.tie_word_embeddings


def test_padding_does_not_leak(pair):
  """A row's logits do not depend on the other rows or on how it is padded."""
  _, model, _ = pair
  ids, mask = padded_batch(LENGTHS, model.config.vocab_size, side="left", seed=5)
  batch = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  n = LENGTHS[2]
  alone = np.asarray(model(jnp.asarray(ids[2:3, -n:])))
  np.testing.assert_allclose(batch[2, -n:], alone[0], atol=2e-5, rtol=0)


def test_bf16_compute_close_to_float32(pair):
  """bf16 matmuls with float32 norms/softmax: mean per-token KL to float32 is small."""
  hf, _, path = pair
  model = load_hf(path, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
  ids, mask = padded_batch(LENGTHS, hf.config.vocab_size, side="left", seed=7)
  ref = jax.nn.log_softmax(hf_logits(hf, ids, mask).astype(np.float64), -1)
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), np.float64)
  ours = jax.nn.log_softmax(ours, -1)
  kl = (np.exp(ref) * (ref - ours)).sum(-1)[mask.astype(bool)]
  # Measured ~1e-4 on these configs; 2e-3 still rules out a wrong norm or RoPE (those
  # give KL of order 0.1-1).
  assert kl.mean() < 2e-3, kl.mean()


def test_kv_cache_decode_equals_full_forward(pair):
  """Prefill a left-padded batch, then decode token by token: same logits as one pass."""
  _, model, _ = pair
  prompt_lengths, new = [6, 3, 5, 2], 4
  ids, mask = padded_batch([n + new for n in prompt_lengths], model.config.vocab_size,
                           side="left", seed=9)
  full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  t = ids.shape[1] - new
  cache = KVCache.zeros(model.config, batch=len(ids), slots=ids.shape[1] + 3)
  step = nnx.jit(lambda m, x, c, mask=None: m(x, attention_mask=mask, cache=c))
  logits, cache = step(model, jnp.asarray(ids[:, :t]), cache, jnp.asarray(mask[:, :t]))
  steps = [np.asarray(logits)]
  for i in range(t, ids.shape[1]):
    logits, cache = step(model, jnp.asarray(ids[:, i:i + 1]), cache)
    steps.append(np.asarray(logits))
  cached = np.concatenate(steps, axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(cached[real], full[real], atol=2e-5, rtol=0)
  assert int(cache.index) == ids.shape[1]


def test_remat_gives_same_gradients(tmp_path):
  path = tmp_path / "ckpt"
  make_hf_model(**CASES["untied-theta5e6-gqa4"]).save_pretrained(path)
  ids, mask = padded_batch([5, 3], 64, side="right", seed=11)

  def grads(remat):
    model = load_hf(path, remat=remat)

    def loss(model):
      return jnp.mean(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)) ** 2)

    return nnx.jit(nnx.grad(loss))(model)

  a, b = grads(False), grads(True)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_remat_layer_scan_in_bf16_matches_the_layer_loop(tmp_path):
  """remat runs the layers as a scan over stacked weights cast to bf16 before stacking;
  the loop casts inside each einsum. Both are bf16 approximations of the float32 program:
  the scan's values and float32 parameter gradients must be as close to float32 as the
  loop's are (the two programs round in different orders, so they differ from each other by
  about that much: ~1-2% of a gradient's norm, depending on the CPU's bf16 kernels)."""
  path = tmp_path / "ckpt"
  make_hf_model(**CASES["tied-theta5e6-gqa2"], layers=3).save_pretrained(path)
  ids, mask = padded_batch([9, 5], 128, side="left", seed=12)

  def run(remat, compute_dtype=jnp.bfloat16):
    model = load_hf(path, compute_dtype=compute_dtype, remat=remat)

    def loss(model):
      hidden, _ = model.hidden_states(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
      return jnp.mean(hidden.astype(jnp.float32) ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    return float(value), {p: np.asarray(g[...]) for p, g in nnx.to_flat_state(grads)}

  (v32, g32), (v_loop, g_loop), (v_scan, g_scan) = (
      run(False, jnp.float32), run(False), run(True))
  assert abs(v_scan - v32) <= 2 * abs(v_loop - v32) + 1e-3 * abs(v32)
  for path_, exact in g32.items():
    assert g_scan[path_].dtype == np.float32, path_
    error = lambda g: np.linalg.norm(g[path_] - exact) / np.linalg.norm(exact)
    assert error(g_loop) < 0.1, (path_, error(g_loop))  # up to ~4.4% seen (AMX Xeon)
    # A wrong layer's weights, a missing cast or a dropped term in the scan would put it far
    # from float32; rounding in another order keeps it near the loop's error.
    assert error(g_scan) <= 2 * error(g_loop) + 5e-3, (path_, error(g_scan), error(g_loop))


# Published totals: the model cards' figures (total / non-embedding) and, where the hub's
# safetensors store the head separately for tied models, the stored tensor total.
PUBLISHED = {
    "Qwen3-0.6B": ("0.6B", "0.44B", 751_632_384),
    "Qwen3-1.7B": ("1.7B", "1.4B", 2_031_739_904),
    "Qwen3-4B": ("4.0B", "3.6B", 4_022_468_096),
    "Qwen3-8B": ("8.2B", "6.95B", 8_190_735_360),
    "Qwen3-4B-Instruct-2507": ("4.0B", "3.6B", 4_022_468_096),
}


def _rounded(n: int, like: str) -> str:
  decimals = len(like.split(".")[1]) - 1 if "." in like else 0
  return f"{n / 1e9:.{decimals}f}B"


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_counts(name):
  config = PRESETS[name]
  model = abstract_model(config)  # shapes only: no memory
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  total = sum(int(np.prod(x.shape)) for x in leaves)
  embed = config.vocab_size * config.hidden_size
  non_embedding = total - embed * (1 if config.tie_word_embeddings else 2)
  card_total, card_non_embedding, stored = PUBLISHED[name]
  assert _rounded(total, card_total) == card_total
  assert _rounded(non_embedding, card_non_embedding) == card_non_embedding
  stored_total = total + (embed if config.tie_word_embeddings and stored > total else 0)
  assert stored_total == stored
  assert total == config.num_params()


def test_instruct_2507_uses_its_own_rope_theta():
  assert PRESETS["Qwen3-4B-Instruct-2507"].rope_theta == 5e6
  assert PRESETS["Qwen3-4B"].rope_theta == 1e6


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    Qwen3Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=3, num_kv_heads=2, head_dim=4)
  with pytest.raises(ValueError, match="hidden_size"):
    Qwen3Config(vocab_size=8, hidden_size=0, intermediate_size=8, num_layers=1,
                num_heads=2, num_kv_heads=2, head_dim=4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_write_slots_matches_numpy(dtype):
  """The cache write (16-bit floats go through their uint16 bits) against NumPy indexing."""
  from oel_jax.models.qwen3 import write_slots
  rng = np.random.default_rng(0)
  cache = rng.normal(size=(2, 3, 9, 4)).astype(np.float32)
  new = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)
  got = jax.jit(write_slots)(jnp.asarray(cache, dtype), jnp.asarray(new), jnp.int32(5))
  expected = np.asarray(jnp.asarray(cache, dtype)).copy()
  expected[:, :, 5:7] = np.asarray(jnp.asarray(new, dtype))
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got), expected)


# --------------------------------------------------------------------------------------
# The embedding lookup of 16-bit tables (gathered as uint16 bits, see `_take_rows_by_bits`)
# --------------------------------------------------------------------------------------

# A table shape no other buffer of these programs has, so that a buffer of this shape is a
# copy of the table.
TABLE_CONFIG = Qwen3Config(vocab_size=1000, hidden_size=96, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=32, param_dtype=jnp.bfloat16,
                           compute_dtype=jnp.bfloat16)


def _buffers_of_shape(hlo_text: str, shape: tuple[int, ...]) -> list[str]:
  """The instructions of a compiled program that write a buffer of `shape`: those run as
  kernels from the entry computation, loop bodies and branches (not the insides of fused
  kernels, which compute elements on demand), less those that only name a buffer
  (parameters, tuples, bitcasts)."""
  computations = parallel.parse_hlo(hlo_text)
  run, todo = set(), ["ENTRY"]
  while todo:
    name = todo.pop()
    if name in run or name not in computations:
      continue
    run.add(name)
    todo += [c for inst in computations[name] if inst.opcode != "fusion" for c in inst.called]
  naming = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
            "call", "optimization-barrier"}
  return [f"{inst.opcode} {inst.name} -> {[str(a.dtype) for a in inst.results]}"
          for name in run for inst in computations[name]
          if inst.opcode not in naming and any(a.shape == shape for a in inst.results)]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_decode_program_writes_no_copy_of_the_embedding_table(tied):
  """The compiled `Sampler` program (prefill + decode loop) of a bf16 model gathers its
  embedding rows from the table as stored: XLA:CPU used to convert the whole `[V, H]` table
  to float32 before the loop, once per call."""
  from oel_jax.models.qwen3 import init_model
  from oel_jax.sampling import Sampler
  config = TABLE_CONFIG.replace(tie_word_embeddings=tied)
  sampler = Sampler(init_model(config), eos_ids=[1], pad_id=0, max_seq_len=128)
  text = sampler.lower(16, 32, 16).compile().as_text()
  shape = (config.vocab_size, config.hidden_size)
  arguments = [a for inst in parallel.parse_hlo(text)["ENTRY"] if inst.opcode == "parameter"
               for a in inst.results]
  assert any(a.shape == shape and a.dtype == "bf16" for a in arguments), "no table argument"
  assert _buffers_of_shape(text, shape) == []


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_embedding_lookup_is_the_plain_gather(dtype):
  """Values (NaN rows past the vocabulary, negative ids from the end) and gradients (repeated
  ids accumulate) bit for bit those of `jnp.take`, and the rows those of NumPy indexing."""
  from oel_jax.models.qwen3 import embed_tokens
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(50, 8)), dtype)
  ids = jnp.asarray([[3, 3, 49, 0], [7, -1, 50, 120]], jnp.int32)
  got = jax.jit(embed_tokens)(table, ids)
  plain = jnp.take(table, ids, axis=0)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                np.asarray(plain).view(np.uint16))
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(table)[[3, 3, 49, 0]])
  np.testing.assert_array_equal(np.asarray(got[1, 1]), np.asarray(table)[-1])
  assert np.isnan(np.asarray(got[1, 2:], np.float32)).all()

  weights = jnp.asarray(rng.normal(size=(2, 4, 8)), dtype)
  grad = lambda gather: jax.jit(jax.grad(
      lambda t: jnp.sum((gather(t, ids) * weights).astype(jnp.float32))))(table)
  ours, theirs = grad(embed_tokens), grad(lambda t, i: jnp.take(t, i, axis=0))
  assert ours.dtype == dtype
  np.testing.assert_array_equal(np.asarray(ours).view(np.uint16),
                                np.asarray(theirs).view(np.uint16))
  assert np.asarray(ours, np.float32)[3].any() and not np.asarray(ours, np.float32)[1].any()


def test_bf16_logits_and_greedy_decode_unchanged_by_the_bit_gather(monkeypatch):
  """A bf16 model's logits (whole forward and cached steps) and a `Sampler`'s greedy tokens
  and log-probabilities are bit for bit those of the plain gather."""
  from oel_jax.models import qwen3
  from oel_jax.sampling import Sampler
  model = qwen3.init_model(TABLE_CONFIG, seed=3)
  ids, mask = padded_batch([9, 5, 7], TABLE_CONFIG.vocab_size, side="left", seed=4)
  prompts = [row[m > 0].tolist() for row, m in zip(ids, mask)]

  def run():
    forward = jax.jit(lambda i, m: model(i, attention_mask=m))(jnp.asarray(ids),
                                                               jnp.asarray(mask))
    cache = KVCache.zeros(model.config, batch=len(ids), slots=ids.shape[1] + 2)
    step = jax.jit(lambda i, m, c: model(i, attention_mask=m, cache=c))
    first, cache = step(jnp.asarray(ids), jnp.asarray(mask), cache)
    second, _ = step(jnp.asarray(ids[:, -1:]), jnp.ones((len(ids), 1), jnp.int32), cache)
    sampler = Sampler(model, eos_ids=[1], pad_id=0, max_seq_len=64)
    out = sampler.generate(prompts, max_new_tokens=12, temperature=0)
    return [np.asarray(x, np.float32) for x in (forward, first, second)], out

  (logits, out) = run()
  monkeypatch.setattr(qwen3, "_take_rows_by_bits", lambda t, i: jnp.take(t, i, axis=0))
  (plain_logits, plain_out) = run()
  for ours, theirs in zip(logits, plain_logits):
    np.testing.assert_array_equal(ours, theirs)
  assert out.tokens == plain_out.tokens
  assert out.logprobs == plain_out.logprobs


def test_16bit_embedding_lookup_on_a_mesh_is_the_plain_gather(monkeypatch):
  """Split over a 2x2x2 mesh (the table as parameters are, `(tp, fsdp)`; ids over the batch
  axes), the bit gather's rows are NumPy's and its gradient is the plain gather's in the
  same program (the mesh sums a repeated row's gradient in another order than one device)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from oel_jax.models import qwen3
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tp=2))
  rng = np.random.default_rng(1)
  table_np = np.asarray(jnp.asarray(rng.normal(size=(64, 16)), jnp.bfloat16))
  ids_np = rng.integers(0, 64, (8, 5)).astype(np.int32)
  table = jax.device_put(table_np, NamedSharding(mesh, P(qwen3.TP, qwen3.FSDP)))
  ids = jax.device_put(ids_np, NamedSharding(mesh, P(("data", "fsdp"))))
  weights = jnp.asarray(rng.normal(size=(8, 5, 16)), jnp.bfloat16)

  def run():
    loss = lambda t: jnp.sum((qwen3.embed_tokens(t, ids) * weights).astype(jnp.float32))
    with jax.set_mesh(mesh):
      rows = jax.jit(lambda t: qwen3.embed_tokens(t, ids))(table)
      return np.asarray(rows).view(np.uint16), np.asarray(jax.jit(jax.grad(loss))(table))

  rows, grad = run()
  monkeypatch.setattr(qwen3, "_take_rows_by_bits", lambda t, i: jnp.take(t, i, axis=0))
  _, plain_grad = run()
  np.testing.assert_array_equal(rows, table_np[ids_np].view(np.uint16))
  np.testing.assert_array_equal(grad.view(np.uint16), plain_grad.view(np.uint16))
