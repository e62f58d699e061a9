"""The consolidation step's matmul precision under 16-bit compute (session 12).

Under a bf16 compute dtype the loss multiplies the unembedding cast to bf16 (`train._head`)
and the model's backward matmuls multiply bf16 operands (`qwen3._einsum`'s custom VJP), both
with float32 accumulation. The references: the program before the change, restored here by
the patch `_before` (float32 compute must be it bit for bit), and the float32-compute step
(bf16 must stay as close to it as the old bf16 program was).
"""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oel_jax import parallel, train
from oel_jax.models import Qwen3Config, init_model, qwen3
from oel_jax.train import TrainConfig, Trainer, make_batch

CONFIG = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)
BF16 = CONFIG.replace(compute_dtype=jnp.bfloat16)
STEP = TrainConfig(learning_rate=1e-3, k=16, micro_batches=2)


@contextlib.contextmanager
def _before():
  """Programs traced inside are the pre-change ones: JAX's own transpose of the model's
  matmuls (float32 cotangents) and the loss handed the unembedding as stored."""
  saved_einsum, saved_head = qwen3._einsum, train._head
  qwen3._einsum = lambda spec, a, b, dtype: jnp.einsum(
      spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
  train._head = lambda model: model.unembedding()
  try:
    yield
  finally:
    qwen3._einsum, train._head = saved_einsum, saved_head


@functools.lru_cache(maxsize=None)
def _batch():
  rng = np.random.default_rng(0)
  knowledge = rng.integers(1, 256, 6).tolist()
  prompts = [rng.integers(1, 256, rng.integers(3, 8)).tolist() for _ in range(8)]
  responses = [rng.integers(1, 256, rng.integers(1, 6)).tolist() for _ in range(8)]
  return make_batch(prompts, [knowledge + p for p in prompts], responses, pad_id=0,
                    student_len=16, teacher_len=24, response_len=8)


def _loss_and_grads(config, old=False):
  """The summed divergence of `_batch()` and its float32 parameter gradients, from the same
  float32 weights for every compute dtype (a fresh trace; under `_before` when `old`)."""
  student, teacher = init_model(config, seed=1), init_model(config, seed=2)
  trainer = Trainer(student, STEP)
  fn = jax.jit(lambda *a: jax.value_and_grad(trainer._loss_stats, has_aux=True)(*a))
  with _before() if old else contextlib.nullcontext():
    (loss, _), grads = fn(nnx.state(student), trainer.teacher_params(teacher), _batch(), None)
  return float(loss), {jax.tree_util.keystr(p): np.asarray(g)
                       for p, g in jax.tree_util.tree_leaves_with_path(grads)}


@pytest.mark.parametrize("remat", [False, True])
def test_float32_compute_is_the_old_program_bit_for_bit(remat):
  config = CONFIG.replace(remat=remat)
  loss, grads = _loss_and_grads(config)
  old_loss, old_grads = _loss_and_grads(config, old=True)
  assert loss == old_loss
  assert grads.keys() == old_grads.keys()
  for path, g in grads.items():
    assert g.dtype == np.float32, path
    np.testing.assert_array_equal(g, old_grads[path], err_msg=path)


def _bf16_results(remat):
  return (_loss_and_grads(CONFIG.replace(remat=remat)),
          _loss_and_grads(BF16.replace(remat=remat), old=True),
          _loss_and_grads(BF16.replace(remat=remat)))


@pytest.mark.parametrize("remat", [False, True])
def test_bf16_compute_is_as_close_to_float32_as_before(remat):
  """bf16 approximates the float32 program; with bf16 backward matmuls and loss head it must
  stay about as close to it as the old bf16 program (float32 backward and head) was.

  Gradients: the form and tolerances of tests/test_teacher_prefix.py's cached bf16 teacher
  test (per parameter, relative to the float32 gradient's norm). The loss: the old program
  multiplied bf16 hidden states by the exact float32 head; rounding the head to bf16 as
  well moves the logits, and the loss, by up to about one bf16 unit in the last place
  (2**-8 relative; 1.9e-3 seen here against 1.3e-4 before, while at Qwen3-0.6B's widths
  `bench_step_precision.py` measured 1.4e-4 against 1.5e-4)."""
  (l32, g32), (l_old, g_old), (l_new, g_new) = _bf16_results(remat)
  assert abs(l_new - l32) <= 2 * abs(l_old - l32) + 2 ** -8 * abs(l32), (l_new, l_old, l32)
  for path, exact in g32.items():
    assert g_new[path].dtype == np.float32, path
    error = lambda g: np.linalg.norm(g[path] - exact) / np.linalg.norm(exact)
    assert error(g_old) < 0.25, (path, error(g_old))  # ~0.1 seen
    assert error(g_new) <= 2 * error(g_old) + 5e-3, (path, error(g_new), error(g_old))


_DOT = re.compile(r"%[\w.\-]+ = (\w+)\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)"
                  r".*?op_name=\"([^\"]*)\"")


def _dots(hlo: str) -> list[tuple[str, str, str, str]]:
  """Each dot of a compiled HLO module: (operand types "lhs x rhs", result shape, JAX name)."""
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  return [(f"{types[a]} x {types[b]}", shape, name)
          for _, shape, a, b, name in _DOT.findall(hlo)]


def _compiled_step_dots(config, old=False):
  student = init_model(config, seed=1)
  teacher = init_model(config.replace(param_dtype=jnp.bfloat16), seed=2)
  trainer = Trainer(student, STEP)
  rng = np.random.default_rng(0)
  ids = [rng.integers(1, 256, 5).tolist() for _ in range(4)]
  b = make_batch(ids, ids, [[7, 8, 9]] * 4, pad_id=0, student_len=8, teacher_len=8,
                 response_len=4)
  with _before() if old else contextlib.nullcontext():
    hlo = trainer.lower(trainer.init_state(student), trainer.teacher_params(teacher),
                        b).compile().as_text()
  return _dots(hlo)


_LOSS_DW = "vc,ch->vh"  # the loss's `[V, H]` gradient tile in bf16, from dz^T `[tile, C]`
_LOSS_LOGITS_T = "vh,ch->vc"  # the transposed logits tile that dz^T is built from
_LOSS_DW_OLD = "cv,ch->vh"  # its direct form: XLA:CPU's own float32 dot of bf16 operands


def _spec(name: str) -> str:
  """The einsum spec a dot's JAX name ends in (the model's and the loss's einsums are named
  by their specs; a custom VJP's backward einsums by theirs)."""
  specs = re.findall(r"[a-z]+,[a-z]+->[a-z]+", name)
  return specs[-1] if specs else ""


@pytest.mark.parametrize("remat", [False, True])
def test_bf16_step_runs_no_float32_matmul(remat):
  """Every matmul of the compiled bf16 step, forward and backward, model and loss, takes bf16
  operands, the loss's `[V, H]` gradient tile included (before session 14 XLA:CPU converted
  that dot's operands to float32 itself: it contracted both operands' leading dimension;
  now its left operand is dz^T, built from logits computed transposed)."""
  dots = _compiled_step_dots(BF16.replace(remat=remat))
  assert all(_spec(d[2]) for d in dots), dots  # every dot is one of ours, found by its name
  head_specs = ("ch,vh->cv", "cv,vh->ch", _LOSS_DW, _LOSS_LOGITS_T)
  model = [d for d in dots if _spec(d[2]) not in head_specs]
  head = [d for d in dots if _spec(d[2]) in head_specs]
  assert len(model) >= 2 * 7 * CONFIG.num_layers, dots  # forward and backward
  assert {_spec(d[2]) for d in head} == set(head_specs), dots
  assert [d for d in model + head if d[0] != "bf16 x bf16"] == []
  # The probe itself: the old program has float32 dots of both kinds, and the direct form
  # of the gradient tile is a float32 dot.
  old = _compiled_step_dots(BF16.replace(remat=remat), old=True)
  assert any(d[0] == "f32 x f32" and "transpose(" in d[2]
             and _spec(d[2]) not in head_specs + (_LOSS_DW_OLD,) for d in old), old
  assert any(d[0] == "f32 x f32" and _spec(d[2]) == "ch,vh->cv" for d in old), old


def test_bf16_direct_gradient_tile_is_a_float32_dot(monkeypatch):
  """The probe for the loss's gradient tile: its direct `[tile, H]` form, in the same bf16
  step, compiles to a float32 dot (what the transposed form avoids)."""
  from oel_jax.losses import chunked
  monkeypatch.setattr(chunked, "_grad_tile_transposed", lambda dtype: False)
  dots = _compiled_step_dots(BF16)
  assert [d[0] for d in dots if _spec(d[2]) == _LOSS_DW_OLD] == ["f32 x f32"], dots


def test_bf16_sharded_step_close_to_single_device():
  """The custom VJP under a mesh (fsdp x tp, layer scan, micro-batch scan): the bf16 step on
  4 devices against the bf16 step on one, to bf16 rounding (the two programs round their
  partial sums in different orders)."""
  rng = np.random.default_rng(1)
  ids = [rng.integers(1, 256, 6).tolist() for _ in range(8)]
  b = make_batch(ids, ids, [[7, 8, 9]] * 8, pad_id=0, student_len=12, teacher_len=12,
                 response_len=4)
  config = BF16.replace(remat=True)
  results = []
  for mesh in (None, parallel.make_mesh(parallel.MeshConfig(fsdp=2, tp=2), jax.devices()[:4])):
    student, teacher = init_model(config, seed=1), init_model(config, seed=2)
    trainer = Trainer(student, STEP, mesh=mesh)
    _, metrics = trainer.train_step(trainer.init_state(student),
                                    trainer.teacher_params(teacher), b)
    results.append(metrics)
  assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=2e-2)
  assert results[1]["grad_norm"] == pytest.approx(results[0]["grad_norm"], rel=5e-2)


# The model's einsums (`qwen3.Attention`, `qwen3.MLP`, `Qwen3.logits`), with operand shapes.
_SPECS = {"bth,hnd->btnd": ((2, 3, 8), (8, 4, 5)), "bth,hkd->bktd": ((2, 3, 8), (8, 2, 5)),
          "btkgd,bksd->bkgts": ((2, 3, 2, 2, 5), (2, 2, 4, 5)),
          "bkgts,bksd->bkgtd": ((2, 2, 2, 3, 4), (2, 2, 4, 5)),
          "btnd,ndh->bth": ((2, 3, 4, 5), (4, 5, 8)), "bth,hi->bti": ((2, 3, 8), (8, 6)),
          "bth,vh->btv": ((2, 3, 8), (16, 8))}


@pytest.mark.parametrize("spec", list(_SPECS))
def test_16bit_einsum_gradients_are_the_float32_transpose_of_bf16_values(spec):
  """With a cotangent that bf16 holds exactly, each operand's gradient is JAX's own float32
  transpose rounded to bf16: the same products, summed in float32 (possibly in another
  order, so to within one bf16 rounding of the result)."""
  rng = np.random.default_rng(3)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in _SPECS[spec])
  out, vjp = jax.vjp(lambda x, y: qwen3._einsum(spec, x, y, jnp.bfloat16), a, b)
  g = jnp.asarray(rng.normal(size=out.shape), jnp.bfloat16).astype(jnp.float32)
  ref_out, ref_vjp = jax.vjp(
      lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32),
      a.astype(jnp.float32), b.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-6)
  for got, ref in zip(vjp(g), ref_vjp(g)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(ref.astype(jnp.bfloat16), np.float32),
                               rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("spec", ["bth,hi", "bth,hi,ij->btj", "bth,ti->bti", "bbh,hi->bi"])
def test_16bit_einsum_rejects_a_spec_its_backward_cannot_transpose(spec):
  x = jnp.ones((2, 2, 2), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"_einsum: spec"):
    qwen3._einsum(spec, x, jnp.ones((2, 2), jnp.bfloat16), jnp.bfloat16)


def test_gradient_tile_takes_the_transposed_form_only_for_cpu(monkeypatch):
  """The transposed form costs one more logits matmul per chunk; only XLA:CPU needs it
  (XLA:TPU multiplies the direct form in bf16: `bench/tpu_compile.py step`). The platform
  comes from the mesh being traced under, else the default backend."""
  from oel_jax.losses import chunked
  assert chunked._grad_tile_transposed(jnp.bfloat16)
  assert not chunked._grad_tile_transposed(jnp.float32)
  seen = []

  def traced(x):
    seen.append(chunked._traced_platform())
    return x

  with jax.set_mesh(parallel.make_mesh(parallel.MeshConfig(fsdp=2), jax.devices()[:2])):
    jax.jit(traced)(1.0)
  assert seen == ["cpu"]
  monkeypatch.setattr(chunked, "_traced_platform", lambda: "tpu")
  assert not chunked._grad_tile_transposed(jnp.bfloat16)
  monkeypatch.undo()
  monkeypatch.setattr(chunked.jax, "default_backend", lambda: "gpu")
  assert chunked._traced_platform() == "gpu"  # no mesh in context: the default backend
  assert not chunked._grad_tile_transposed(jnp.bfloat16)
