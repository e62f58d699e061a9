"""The teacher's cached knowledge prefixes against today's whole teacher prompts.

The reference is the existing path: `Trainer` with batches of whole teacher sequences
(`make_batch`), whose teacher forward `tests/test_train.py` checks against plain logits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oel_jax import consolidate, parallel, teacher_prefix, tiny
from oel_jax.consolidate import ConsolidationConfig, run_consolidation
from oel_jax.envs import ModelInfo, make_env
from oel_jax.models import Qwen3Config, init_model
from oel_jax.sampling import common_prefix_length
from oel_jax.train import TrainConfig, Trainer, make_batch, with_teacher_prefix

from scripted_sampler import ScriptedSampler

CONFIG = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)
STEP = TrainConfig(learning_rate=1e-3, k=16)
HEAD, SEP = [1, 2, 3], [4, 5]  # stand-ins for the chat template's opening / the format's text


def _rows(seed=0, rows=8):
  """Teacher prompts HEAD + knowledge + SEP + situation over knowledge texts of different
  lengths (one empty); text 2's cached ids run one token past the shared part, into the
  situation some of its rows start with (those rows use it, the others stop before it)."""
  rng = np.random.default_rng(seed)
  knowledge = [rng.integers(6, 64, n).tolist() for n in (5, 0, 17)]
  prefix_ids = [HEAD + k + SEP for k in knowledge]
  prefix_ids[2] = prefix_ids[2] + [60]
  contexts = [0, 1, 2, 2, 0, 2, 1, 2][:rows]
  student = [rng.integers(6, 64, rng.integers(3, 8)).tolist() for _ in range(rows)]
  for i, c in enumerate(contexts):  # of text 2's rows, row 2 alone shares the extra token
    if c == 2:
      student[i][0] = 60 if i == 2 else 61
  teacher = [HEAD + knowledge[c] + SEP + s for c, s in zip(contexts, student)]
  responses = [rng.integers(6, 64, rng.integers(1, 6)).tolist() for _ in range(rows)]
  return student, teacher, responses, contexts, prefix_ids


@functools.lru_cache(maxsize=None)
def _trainer(config, train=STEP, axes=None):
  mesh = None if axes is None else parallel.make_mesh(parallel.MeshConfig(**dict(axes)))
  return Trainer(init_model(config, seed=1), train, mesh=mesh)


@functools.lru_cache(maxsize=None)
def _grad_fn(trainer):
  return jax.jit(jax.value_and_grad(trainer._loss_stats, has_aux=True))


def _loss_and_grads(trainer, student, teacher, batch, prefix):
  """The step's summed divergence and its gradient (the quantities the step normalises)."""
  kv = None if prefix is None else prefix.kv
  (loss, _), grads = _grad_fn(trainer)(nnx.state(student), trainer.teacher_params(teacher),
                                       batch, kv)
  return float(loss), jax.tree.map(np.asarray, grads)


def _both_paths(config, seed=0):
  student_p, teacher_p, responses, contexts, prefix_ids = _rows(seed)
  whole = make_batch(student_p, teacher_p, responses, pad_id=0)
  cached = with_teacher_prefix(student_p, teacher_p, responses, contexts, prefix_ids, pad_id=0)
  trainer = _trainer(config)
  student, teacher = init_model(config, seed=1), init_model(config, seed=2)
  prefix = trainer.knowledge_prefix(trainer.teacher_params(teacher), prefix_ids, length=32)
  return trainer, student, teacher, whole, cached, prefix


def _relative_error(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(x - y).max() / np.abs(y).max()), a, b)))


def test_rows_use_the_cached_tokens_their_prompts_start_with():
  _, teacher_p, _, contexts, prefix_ids = _rows()
  rest, used = teacher_prefix.split_prompts(teacher_p, contexts, prefix_ids)
  assert used == [len(prefix_ids[c]) - (c == 2 and i != 2) for i, c in enumerate(contexts)]
  assert used[2] == len(prefix_ids[2])  # the extra cached token its situation starts with
  for prompt, r, n in zip(teacher_p, rest, used):
    assert prompt[:n] + r == prompt and len(r) >= 1
  # A prompt that is all cached keeps its last token to compute.
  rest, used = teacher_prefix.split_prompts([prefix_ids[0]], [0], prefix_ids)
  assert used == [len(prefix_ids[0]) - 1] and rest == [prefix_ids[0][-1:]]


@pytest.mark.parametrize("block", [0, 8], ids=["plain", "blockwise"])
def test_cached_teacher_gives_todays_loss_and_gradients_float32(block):
  config = CONFIG.replace(attention_block_size=block)
  trainer, student, teacher, whole, cached, prefix = _both_paths(config)
  assert cached.teacher_ids.shape[1] < whole.teacher_ids.shape[1]
  loss, grads = _loss_and_grads(trainer, student, teacher, whole, None)
  loss_c, grads_c = _loss_and_grads(trainer, student, teacher, cached, prefix)
  assert loss_c == pytest.approx(loss, rel=1e-5)
  assert _relative_error(grads_c, grads) < 1e-5
  if block == 0:
    return
  # The whole jitted step (one program per path): metrics and the updated weights.
  tp = trainer.teacher_params(teacher)
  s0, m0 = trainer.train_step(trainer.init_state(student), tp, whole)
  s1, m1 = trainer.train_step(trainer.init_state(student), tp, cached, teacher_prefix=prefix)
  for name in ("loss", "grad_norm", "teacher_entropy", "teacher_topk_mass",
               "student_topk_mass"):
    assert m1[name] == pytest.approx(m0[name], rel=1e-5), name
  assert m1["tokens"] == m0["tokens"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5),
               jax.tree.map(np.asarray, s1.params), jax.tree.map(np.asarray, s0.params))


def test_cached_teacher_in_bf16_is_as_close_to_float32_as_todays():
  """bf16 approximates the float32 program; the cached path must be as close to it as
  today's bf16 path is (the tolerance of tests/test_qwen3.py's bf16 layer scan)."""
  trainer, student, teacher, whole, cached, prefix = _both_paths(CONFIG)
  loss32, grads32 = _loss_and_grads(trainer, student, teacher, whole, None)
  bf16 = CONFIG.replace(compute_dtype=jnp.bfloat16)
  trainer, student, teacher, whole, cached, prefix = _both_paths(bf16)
  loss, grads = _loss_and_grads(trainer, student, teacher, whole, None)
  loss_c, grads_c = _loss_and_grads(trainer, student, teacher, cached, prefix)
  assert prefix.kv.k[0].dtype == jnp.bfloat16
  assert abs(loss_c - loss32) <= 2 * abs(loss - loss32) + 1e-3 * abs(loss32)
  for (path, exact), g, g_c in zip(jax.tree_util.tree_leaves_with_path(grads32),
                                   jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
    error = lambda x: np.linalg.norm(x - exact) / np.linalg.norm(exact)
    assert error(g) < 0.25, (path, error(g))  # bf16 computes the same thing (~0.1 seen)
    assert error(g_c) <= 2 * error(g) + 5e-3, (path, error(g_c), error(g))


def test_sharded_cached_step_equals_single_device():
  axes = (("data", 2), ("fsdp", 2), ("tp", 2))
  single, student, teacher, _, cached, prefix = _both_paths(CONFIG)
  _, m0 = single.train_step(single.init_state(student), single.teacher_params(teacher),
                            cached, teacher_prefix=prefix)
  sharded = _trainer(CONFIG, axes=axes)
  tp = sharded.teacher_params(teacher)
  prefix_s = sharded.knowledge_prefix(tp, prefix.ids, length=32)
  k = prefix_s.kv.k[0]
  # Like the weights: heads over tp, slots over fsdp; every shard holds all three texts.
  assert k.sharding.spec == jax.sharding.PartitionSpec(None, "tp", "fsdp")
  assert k.addressable_shards[0].data.shape == (3, CONFIG.num_kv_heads // 2, 32 // 2, 16)
  np.testing.assert_allclose(np.asarray(k), np.asarray(prefix.kv.k[0]), atol=1e-5)
  _, m1 = sharded.train_step(sharded.init_state(student), tp, cached, teacher_prefix=prefix_s)
  assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5)
  assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-4)


def test_mismatched_batch_and_prefix_are_refused_before_compiling():
  trainer, student, teacher, whole, cached, prefix = _both_paths(CONFIG)
  state, tp = trainer.init_state(student), trainer.teacher_params(teacher)
  compiled = trainer.num_compilations
  with pytest.raises(ValueError, match="pass teacher_prefix="):
    trainer.train_step(state, tp, cached)
  with pytest.raises(ValueError, match="teacher rows are whole sequences"):
    trainer.train_step(state, tp, whole, teacher_prefix=prefix)
  longer = cached.replace(teacher_prefix_len=cached.teacher_prefix_len.at[1].set(99))
  with pytest.raises(ValueError, match="teacher_prefix_len row 1 is 99"):
    trainer.train_step(state, tp, longer, teacher_prefix=prefix)
  other = cached.replace(teacher_context=cached.teacher_context.at[0].set(3))
  with pytest.raises(ValueError, match="row 0 names text 3; the prefix caches 3 texts"):
    trainer.train_step(state, tp, other, teacher_prefix=prefix)
  with pytest.raises(ValueError, match="draws context 5"):
    teacher_prefix.split_prompts([[1, 2]], [5], prefix.ids)
  assert trainer.num_compilations == compiled


# ---- the consolidation stage: real prompts, chat template, the run's default ----


def _trajectories():
  out = []
  for game, seed, replies in [("frozenlake", 1, ["[down]", "[right]"]),
                              ("sokoban", 3, ["[up]", "[left]"]), ("frozenlake", 5, ["[up]"])]:
    env = make_env(game, seed=seed, max_turns=len(replies))
    env.reset()
    for reply in replies:
      if env.step(reply)[1]:
        break
    out.append(env.trajectory(ModelInfo("tiny", 0)))
  return out


KNOWLEDGE = ("- EXPERIENCE ITEM: Holes end the game; step around them.",
             "",
             "- EXPERIENCE ITEM: The goal is at the bottom right; move down and right. " * 6)


def test_cached_prefix_covers_the_template_header_and_knowledge_of_every_teacher_prompt():
  tok = tiny.load_tiny_tokenizer()
  config = ConsolidationConfig(enable_thinking=False)
  prefixes = consolidate.build_prefixes(_trajectories())
  ids = consolidate.teacher_prefix_ids(prefixes, KNOWLEDGE, tok, config)
  for c, text in enumerate(KNOWLEDGE):
    head = tok.decode(ids[c])
    assert head.startswith("<|im_start|>user\n") and text in head
    if text:
      assert head.index(text) + len(text) < len(head)  # cached past the knowledge block
    for p in prefixes:
      whole = consolidate.encode_prompt(tok, consolidate.insert_knowledge(p, text),
                                        enable_thinking=False)
      # Only the boundary token may differ (tokenised alone vs inside the prompt).
      assert common_prefix_length([whole, ids[c]]) >= len(ids[c]) - 1


def _run(tok, trajectories, cache):
  model = tiny.tiny_model(0, num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2,
                          num_kv_heads=1)
  sampler = ScriptedSampler(tok, lambda user, seed: ("[down]", 6 + seed % 5))
  sampler.update_weights = lambda params: None
  config = ConsolidationConfig(
      steps=2, games_per_step=2, max_new_tokens=16, enable_thinking=False,
      min_length_bucket=64, min_row_bucket=4, seed=3, teacher_prefix_cache=cache,
      train=TrainConfig(learning_rate=1e-3, k=16))
  return run_consolidation(model, model, tok, trajectories, KNOWLEDGE, config,
                           sampler=sampler, progress=False)


def test_consolidation_uses_the_cache_by_default_with_the_same_steps():
  tok = tiny.load_tiny_tokenizer()
  assert ConsolidationConfig().teacher_prefix_cache
  trajectories = _trajectories()
  plain, cached = _run(tok, trajectories, False), _run(tok, trajectories, True)
  for a, b in zip(plain.metrics, cached.metrics):
    assert a["teacher_cached_tokens"] == 0 and b["teacher_cached_tokens"] > 20
    assert b["teacher_len"] < a["teacher_len"]
    # The loss is near 0 here (the teacher is the student with a little knowledge), so its
    # rounding is relatively large: an absolute bound, ~100x the ~1e-9 seen.
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-7)
    for name in ("grad_norm", "teacher_entropy", "teacher_topk_mass"):
      assert b[name] == pytest.approx(a[name], rel=1e-5), name
    assert b["tokens"] == a["tokens"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       atol=5e-5),
               nnx.state(cached.model), nnx.state(plain.model))


@pytest.mark.parametrize("axes", [None, (("data", 2), ("fsdp", 2), ("tp", 2))],
                         ids=["one_device", "mesh_2x2x2"])
def test_remat_runs_the_cached_teacher_as_one_layer_scan_with_the_same_loss(axes):
  """With ``remat`` the cached teacher's layers run as one scan over stacked weights and
  caches (what keeps big models' per-layer gathers from piling up): the same loss and
  gradients as today's whole teacher rows, float32, on one device and on a mesh."""
  plain = CONFIG.replace(attention_block_size=8)
  trainer, student, teacher, whole, cached, prefix = _both_paths(plain)
  remat = _trainer(plain.replace(remat=True), axes=axes)
  tp = remat.teacher_params(teacher)
  prefix_r = remat.knowledge_prefix(tp, prefix.ids, length=32)
  model = nnx.merge(remat.graphdef, tp)
  jaxpr = jax.make_jaxpr(lambda: teacher_prefix.hidden_states_with_prefix(
      model, prefix_r.kv, cached.teacher_ids, cached.teacher_mask, cached.teacher_context,
      cached.teacher_prefix_len))()
  assert "scan" in str(jaxpr)
  if axes is None:
    loss, grads = _loss_and_grads(trainer, student, teacher, whole, None)
    loss_r, grads_r = _loss_and_grads(remat, student, teacher, cached, prefix_r)
    assert loss_r == pytest.approx(loss, rel=1e-5)
    assert _relative_error(grads_r, grads) < 1e-5
    return
  _, m0 = trainer.train_step(trainer.init_state(student), trainer.teacher_params(teacher),
                             whole)
  _, m1 = remat.train_step(remat.init_state(student), tp, cached, teacher_prefix=prefix_r)
  assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5)
  assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-4)
