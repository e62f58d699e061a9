"""The consolidation train step: loss, accumulation, sharding, learning, failure handling."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from oel_jax import losses, parallel
from oel_jax.models import Qwen3Config, init_model
from oel_jax.train import DistillBatch, NonFiniteLossError, TrainConfig, Trainer, make_batch

CONFIG = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)


# Adam's first step is lr * g / (|g| + eps): for coordinates whose gradient is ~eps, float32
# rounding in g moves the update by a few percent of lr (1e-3 here), so parameters are
# compared to 5% of one step.
PARAM_ATOL = 5e-5

STEP = TrainConfig(learning_rate=1e-3, k=16)
"""The step most tests take; they share its compiled program (`_trainer`)."""

_TRAINERS: dict = {}


def _trainer(student, cfg, mesh=None, devices=None):
  """This module's one `Trainer` per model config, train config and mesh (a `MeshConfig` over
  the first `devices` devices): a test that takes a step another test has taken reuses its
  jitted program, as consolidation reuses one trainer for every step. The trainer keeps no
  state between steps besides that program; tests of tracing and compiling build their own."""
  key = (student.config, cfg, mesh, devices)
  if key not in _TRAINERS:
    mesh = None if mesh is None else parallel.make_mesh(
        mesh, None if devices is None else jax.devices()[:devices])
    _TRAINERS[key] = Trainer(student, cfg, mesh=mesh)
  return _TRAINERS[key]


def _random_batch(rng, rows, knowledge, *, vocab=64):
  prompts = [rng.integers(1, vocab, rng.integers(3, 8)).tolist() for _ in range(rows)]
  responses = [rng.integers(1, vocab, rng.integers(1, 6)).tolist() for _ in range(rows)]
  return prompts, [knowledge + p for p in prompts], responses


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  knowledge = rng.integers(1, 64, 6).tolist()
  sp, tp, resp = _random_batch(rng, 8, knowledge)
  batch = make_batch(sp, tp, resp, pad_id=0, student_len=16, teacher_len=24, response_len=8)
  return batch, (sp, tp, resp)


@functools.partial(jax.jit, static_argnums=0)
def _logits_at(graphdef, params, ids, mask, index):
  """The model's plain logits (the whole vocabulary, no chunks) at the response positions.
  Jitted: run op by op, a forward and backward pass costs far more in per-op compiles and
  dispatch than compiling it once; the arithmetic is the same."""
  logits = nnx.merge(graphdef, params)(ids, attention_mask=mask)
  return jnp.take_along_axis(logits, index[..., None], axis=1)


def _gathered_logits(model, ids, mask, index):
  return _logits_at(*nnx.split(model), ids, mask, index)


def test_batch_alignment(setup):
  batch, (sp, tp, resp) = setup
  for i in range(len(resp)):
    n = len(resp[i])
    s_next = batch.student_ids[i][batch.student_index[i, :n] + 1]
    t_next = batch.teacher_ids[i][batch.teacher_index[i, :n] + 1]
    assert s_next.tolist() == resp[i] == t_next.tolist()
    assert batch.response_mask[i].sum() == n
    # The teacher's input holds the knowledge before the same prompt.
    assert batch.teacher_ids[i][: len(tp[i])].tolist() == tp[i]


@pytest.mark.parametrize("cfg", [STEP,
                                 TrainConfig(learning_rate=1e-3, k=5, temperature=1.3,
                                             renormalize=True),
                                 TrainConfig(learning_rate=1e-3, k=5, temperature=1.3,
                                             tail=True)])
def test_step_loss_and_update_match_a_plain_reference(setup, cfg):
  batch, _ = setup
  student, teacher = init_model(CONFIG, seed=1), init_model(CONFIG, seed=2)
  trainer = _trainer(student, cfg)
  state = trainer.init_state(student)
  params0 = jax.tree.map(np.asarray, nnx.state(student))

  def plain_loss(params):
    ls = _logits_at(trainer.graphdef, params, batch.student_ids, batch.student_mask,
                    batch.student_index)
    lt = _gathered_logits(teacher, batch.teacher_ids, batch.teacher_mask,
                          batch.teacher_index)
    return losses.topk_reverse_kl(ls, lt, batch.response_mask, k=cfg.k,
                                  temperature=cfg.temperature, renormalize=cfg.renormalize,
                                  tail=cfg.tail)

  ref_loss, ref_grads = jax.value_and_grad(plain_loss)(nnx.state(student))
  tx = cfg.optimizer()
  updates, _ = tx.update(ref_grads, tx.init(nnx.state(student)), nnx.state(student))
  ref_params = optax.apply_updates(nnx.state(student), updates)

  state, metrics = trainer.train_step(state, trainer.teacher_params(teacher), batch)
  assert metrics["loss"] == pytest.approx(float(ref_loss), rel=1e-5)
  assert metrics["grad_norm"] == pytest.approx(float(optax.global_norm(ref_grads)), rel=1e-4)
  assert metrics["tokens"] == float(batch.response_mask.sum())
  s_logits = _gathered_logits(student, batch.student_ids, batch.student_mask,
                              batch.student_index)
  ent = losses.entropy_from_logits(s_logits, temperature=cfg.temperature)
  want = float((ent * batch.response_mask).sum() / batch.response_mask.sum())
  assert metrics["student_entropy"] == pytest.approx(want, rel=1e-5)
  # Each model's mass on the student's top-k, token means in float64.
  t_logits = _gathered_logits(teacher, batch.teacher_ids, batch.teacher_mask,
                              batch.teacher_index)
  ls = jax.nn.log_softmax(np.asarray(s_logits, np.float64) / cfg.temperature)
  lt = jax.nn.log_softmax(np.asarray(t_logits, np.float64) / cfg.temperature)
  top = np.argsort(-np.asarray(ls), axis=-1)[..., :cfg.k]
  w = np.asarray(batch.response_mask, np.float64)
  for name, lp in (("student_topk_mass", ls), ("teacher_topk_mass", lt)):
    mass = np.exp(np.take_along_axis(np.asarray(lp), top, -1)).sum(-1)
    assert metrics[name] == pytest.approx((mass * w).sum() / w.sum(), rel=1e-5), name
  assert 0 < metrics["teacher_topk_mass"] < metrics["student_topk_mass"] < 1
  assert metrics["finite"] is True
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL),
               jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, ref_params))
  assert int(state.step) == 1
  # The step really moved the weights.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                                       state.params, params0))
  assert max(moved) > 1e-4


def test_micro_batches_accumulate_to_the_same_step(setup):
  batch, _ = setup
  student, teacher = init_model(CONFIG, seed=1), init_model(CONFIG, seed=2)
  results = []
  for m in (1, 4):
    trainer = _trainer(student, dataclasses.replace(STEP, micro_batches=m))
    state, metrics = trainer.train_step(trainer.init_state(student),
                                        trainer.teacher_params(teacher), batch)
    results.append((metrics, jax.tree.map(np.asarray, state.params)))
  (m1, p1), (m4, p4) = results
  assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-5)
  assert m4["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL), p1, p4)


@pytest.mark.parametrize("axes", [dict(data=1, fsdp=4, tp=2), dict(data=2, fsdp=4, tp=1)])
def test_sharded_step_equals_single_device(setup, axes):
  batch, _ = setup
  student, teacher = init_model(CONFIG, seed=1), init_model(CONFIG, seed=2)
  single = _trainer(student, STEP)
  s_state, s_metrics = single.train_step(single.init_state(student),
                                         single.teacher_params(teacher), batch)
  sharded = _trainer(student, STEP, mesh=parallel.MeshConfig(**axes))
  state = sharded.init_state(student)
  state, metrics = sharded.train_step(state, sharded.teacher_params(teacher), batch)
  assert metrics["loss"] == pytest.approx(s_metrics["loss"], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=PARAM_ATOL),
               state.params, s_state.params)
  # Parameters and both Adam moments really are split over the mesh.
  up = state.params["layers"][0]["mlp"]["up_proj"][...]
  assert up.addressable_shards[0].data.shape == (64 // axes["fsdp"], 128 // axes["tp"])
  mu = state.opt_state[1][0].mu["layers"][0]["mlp"]["up_proj"][...]
  assert mu.sharding.spec == P_spec("fsdp", "tp")
  assert mu.addressable_shards[0].data.shape == up.addressable_shards[0].data.shape


def P_spec(*axes):
  return jax.sharding.PartitionSpec(*axes)


def _sharpened(model, scale=5.0):
  """Weights with std 0.1 instead of 0.02, so that context moves the next-token
  distribution substantially (as in a trained model)."""
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, state))
  return model


def test_context_distillation_learns_the_knowledge():
  """The student, trained without the knowledge, comes to act as the teacher with it."""
  rng = np.random.default_rng(1)
  knowledge = rng.integers(1, 64, 8).tolist()
  teacher = _sharpened(init_model(CONFIG, seed=3))
  student = _sharpened(init_model(CONFIG, seed=3))  # the round-start model: same weights
  # Full-vocabulary support: at V = 64 a top-k set leaves much of the mass out and the
  # truncated sum is then no divergence (its minimum is not student == teacher). At
  # Qwen3's V = 151,936 the top-256 holds nearly all the mass; the top-k path itself is
  # checked against the plain loss above.
  trainer = Trainer(student, TrainConfig(learning_rate=1e-3, k=0, temperature=1.0))
  teacher_params = trainer.teacher_params(teacher)
  teacher_before = jax.tree.map(np.asarray, teacher_params)
  state = trainer.init_state(student)

  def held_out_kl(params, batch):
    ls = _logits_at(trainer.graphdef, params, batch.student_ids, batch.student_mask,
                    batch.student_index)
    lt = _gathered_logits(teacher, batch.teacher_ids, batch.teacher_mask,
                          batch.teacher_index)
    return float(losses.topk_reverse_kl(ls, lt, batch.response_mask, k=0))

  def batch_of(rows, seed):
    sp, tp, resp = _random_batch(np.random.default_rng(seed), rows, knowledge)
    return make_batch(sp, tp, resp, pad_id=0, student_len=16, teacher_len=24, response_len=8)

  held_out = batch_of(32, seed=12345)
  before = held_out_kl(state.params, held_out)
  for step in range(300):
    state, _ = trainer.train_step(state, teacher_params, batch_of(16, seed=step))
  after = held_out_kl(state.params, held_out)
  assert before > 0.05, before  # the knowledge really changes the teacher
  print(f"held-out KL(student || teacher with knowledge): {before:.4f} -> {after:.4f}")
  assert after < before / 5, (before, after)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               teacher_params, teacher_before)
  assert trainer.num_compilations == 1


def test_non_finite_loss_stops_with_state_unchanged(setup):
  batch, _ = setup
  student = init_model(CONFIG, seed=1)
  trainer = _trainer(student, STEP)
  state = trainer.init_state(student)
  before = jax.tree.map(np.asarray, state.params)
  teacher = trainer.teacher_params(init_model(CONFIG, seed=2))
  bad_teacher = jax.tree.map(lambda x: x, teacher)
  # float32 like the weights it replaces: a weak-typed NaN would retrace the step.
  bad_teacher["final_norm"]["scale"][...] = jnp.full((64,), jnp.nan, jnp.float32)
  with pytest.raises(NonFiniteLossError, match="non-finite loss nan.*not updated") as err:
    trainer.train_step(state, bad_teacher, batch)
  kept = err.value.state
  assert int(kept.step) == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), kept.params,
               before)

  # skip_non_finite: the same unchanged state comes back, with finite=False, and training
  # goes on from it.
  kept_opt = jax.tree.map(np.asarray, kept.opt_state)
  state, metrics = trainer.train_step(kept, bad_teacher, batch, skip_non_finite=True)
  assert metrics["finite"] is False and np.isnan(metrics["loss"])
  assert int(state.step) == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params,
               before)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.opt_state,
               kept_opt)
  state, metrics = trainer.train_step(state, teacher, batch, skip_non_finite=True)
  assert metrics["finite"] is True and np.isfinite(metrics["loss"])
  assert int(state.step) == 1


def test_learning_rate_zero_leaves_the_weights_exactly_as_they_were(setup):
  """The demo's control run: every step runs (loss, gradient, AdamW with weight decay) and the
  weights do not move."""
  batch, _ = setup
  student, teacher = init_model(CONFIG, seed=1), init_model(CONFIG, seed=2)
  trainer = Trainer(student, TrainConfig(learning_rate=0.0, k=16))
  state = trainer.init_state(student)
  before = jax.tree.map(np.asarray, state.params)
  for _ in range(2):
    state, metrics = trainer.train_step(state, trainer.teacher_params(teacher), batch)
  assert metrics["grad_norm"] > 0 and int(state.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params,
               before)
  for bad in (-1e-4, float("nan")):
    with pytest.raises(ValueError, match="TrainConfig.learning_rate must be >= 0"):
      TrainConfig(learning_rate=bad)


def test_tail_config_is_checked():
  with pytest.raises(ValueError, match="tail and TrainConfig.renormalize"):
    TrainConfig(tail=True, renormalize=True)
  with pytest.raises(ValueError, match="reverse-KL"):
    TrainConfig(tail=True, divergence=losses.FORWARD_KL)
  with pytest.raises(ValueError, match="TrainConfig.tail must be a bool"):
    TrainConfig(tail=1)
  assert TrainConfig().tail is False  # the official loss by default


def test_bad_configuration_fails_before_compiling(setup):
  batch, _ = setup
  student = init_model(CONFIG, seed=1)
  with pytest.raises(ValueError, match=r"TrainConfig.k \(65\) exceeds the vocabulary \(64\)"):
    Trainer(student, TrainConfig(k=65))
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=8, tp=1))
  trainer = Trainer(student, TrainConfig(k=16, micro_batches=2), mesh=mesh)
  with pytest.raises(ValueError, match=r"micro-batch size 4 .* not divisible by mesh axes "
                     r"data x fsdp \(8\)"):
    trainer.train_step(trainer.init_state(student), trainer.teacher_params(student), batch)
  assert trainer.num_compilations == 0
  with pytest.raises(ValueError, match=r"num_kv_heads \(2\) is not divisible by mesh axis "
                     r"'tp' \(4\)"):
    Trainer(student, TrainConfig(k=16), mesh=parallel.make_mesh(parallel.MeshConfig(fsdp=2, tp=4)))


def test_rematerialised_layers_give_the_same_step(setup):
  """remat inside the micro-batch scan and grad (the large-model configuration)."""
  batch, _ = setup
  results = []
  for remat in (False, True):
    config = CONFIG.replace(remat=remat)
    student, teacher = init_model(config, seed=1), init_model(config, seed=2)
    trainer = _trainer(student, dataclasses.replace(STEP, micro_batches=2))
    state, metrics = trainer.train_step(trainer.init_state(student),
                                        trainer.teacher_params(teacher), batch)
    results.append((metrics, jax.tree.map(np.asarray, state.params)))
  (m0, p0), (m1, p1) = results
  assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL), p0, p1)


def test_sharded_rematerialised_step_equals_single_device_plain(setup):
  """The layer scan under a mesh (stacked weights constrained to their shardings, micro-batch
  scan, fsdp x tp) against the plain single-device step."""
  batch, _ = setup
  cfg = dataclasses.replace(STEP, micro_batches=2)
  plain = init_model(CONFIG, seed=1)
  single = _trainer(plain, cfg)
  s_state, s_metrics = single.train_step(single.init_state(plain),
                                         single.teacher_params(init_model(CONFIG, seed=2)),
                                         batch)
  config = CONFIG.replace(remat=True)
  student, teacher = init_model(config, seed=1), init_model(config, seed=2)
  sharded = _trainer(student, cfg, mesh=parallel.MeshConfig(fsdp=2, tp=2), devices=4)
  state, metrics = sharded.train_step(sharded.init_state(student),
                                      sharded.teacher_params(teacher), batch)
  assert metrics["loss"] == pytest.approx(s_metrics["loss"], rel=1e-5)
  assert metrics["grad_norm"] == pytest.approx(s_metrics["grad_norm"], rel=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=PARAM_ATOL),
               state.params, s_state.params)


def test_fused_optimizer_is_optax_bit_for_bit():
  """`apply_optimizer` (moments selected first, the update taken from them) against optax's
  chain applied as documented, each result `jnp.where(finite, new, old)`: every parameter,
  moment and count bit for bit, through steps with and without clipping, a non-finite
  step (NaN gradients, `finite` False: nothing changes) and the steps after it."""
  from oel_jax.train import apply_optimizer
  config = TrainConfig(learning_rate=3e-2, weight_decay=0.1, max_grad_norm=1.0)
  tx = config.optimizer()
  rng = np.random.default_rng(7)
  shapes = {"table": (61, 24), "norm": (24,), "mlp": {"up": (24, 40), "down": (40, 24)}}
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))

  def reference(grads, opt_state, params, finite):
    updates, new_state = tx.update(grads, opt_state, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(optax.apply_updates(params, updates), params), keep(new_state, opt_state)

  fused = jax.jit(functools.partial(apply_optimizer, config, tx))
  reference = jax.jit(reference)
  bits = lambda tree: [np.atleast_1d(np.asarray(x)).view(np.uint8) for x in jax.tree.leaves(tree)]
  ours = ref = (params, tx.init(params))
  for scale, finite in ((0.01, True), (5.0, True), (float("nan"), False), (0.005, True),
                        (3.0, True)):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32),
                         params)
    norm = float(optax.global_norm(grads))
    assert (norm > config.max_grad_norm) == (scale > 1) or not finite  # both branches of clip
    ours = fused(grads, ours[1], ours[0], jnp.asarray(finite))
    ref = reference(grads, ref[1], ref[0], jnp.asarray(finite))
    for a, b in zip(bits(ours), bits(ref)):
      np.testing.assert_array_equal(a, b)
  assert int(ours[1][1][0].count) == 4  # the non-finite step did not count
  assert not np.allclose(np.asarray(ours[0]["table"]), np.asarray(params["table"]))
