"""Tests for oel_jax.losses against an independent float64 NumPy reference.

The reference below is written from the formulas in DESIGN.md section 5.3, with the gradient
with respect to the student logits derived by hand (no autodiff):

  s = z / T, ls = s - logsumexp(s), lt likewise, q = exp(ls); S the support.
  Reverse KL, D = sum_S exp(a) (a - b) with a = ls|S, b = lt|S:  dD/da = exp(a) (a - b + 1).
  Forward KL, D = sum_S exp(b) (b - a):                          dD/da = -exp(b).
  No renormalisation: a = ls|S, so dD/ds_j = g_j [j in S] - q_j sum_S g.
  Tail bucket of the reverse KLs (P = 1 - sum_S exp(a), Q = 1 - sum_S exp(b), summed here
  over the complement of S; P depends on a only through sum_S exp(a)):
    D += P (log P - log Q), so dD/da += -exp(a) (log P - log Q + 1); 0 when P = 0.
  Renormalised over S: a = s|S - logsumexp(s|S), so dD/ds_j = g_j - exp(a_j) sum_S g on S.
  dD/dz = dD/ds / T.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oel_jax import losses

# ------------------------------------------------------------------------------------------
# float64 NumPy reference.


def _np_log_softmax(x):
  m = np.max(x, axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _np_support(ls, lt, divergence, k):
  """Boolean support [V] for one token."""
  v = ls.shape[-1]
  sup = np.zeros(v, bool)
  if k == 0 or k >= v:
    sup[:] = True
  elif divergence == losses.TOPK_REVERSE_KL:
    sup[np.argsort(-ls)[:k]] = True
  elif divergence == losses.FORWARD_KL:
    sup[np.argsort(-lt)[:k]] = True
  else:
    sup[np.argsort(-ls)[:k]] = True
    sup[np.argsort(-lt)[:k]] = True
  return sup


def np_per_token(zs, zt, divergence, k, temperature, renormalize, tail=False):
  """Per-token D [N] and dD/dz_student [N, V] for float64 logits [N, V]."""
  ls = _np_log_softmax(zs / temperature)
  lt = _np_log_softmax(zt / temperature)
  q = np.exp(ls)
  d = np.zeros(zs.shape[0])
  dz = np.zeros_like(zs)
  for n in range(zs.shape[0]):
    sup = _np_support(ls[n], lt[n], divergence, k)
    a, b = ls[n, sup], lt[n, sup]
    if renormalize:
      a = a - np.log(np.sum(np.exp(a)))
      b = b - np.log(np.sum(np.exp(b)))
    if divergence == losses.FORWARD_KL:
      d[n] = np.sum(np.exp(b) * (b - a))
      g = -np.exp(b)
    else:
      d[n] = np.sum(np.exp(a) * (a - b))
      g = np.exp(a) * (a - b + 1.0)
    if tail:
      p_tail, q_tail = np.sum(np.exp(ls[n, ~sup])), np.sum(np.exp(lt[n, ~sup]))
      if p_tail > 0:
        d[n] += p_tail * (np.log(p_tail) - np.log(q_tail))
        g = g - np.exp(a) * (np.log(p_tail) - np.log(q_tail) + 1.0)
    ds = np.zeros(zs.shape[1])
    if renormalize:
      ds[sup] = g - np.exp(a) * np.sum(g)
    else:
      ds[sup] = g
      ds -= q[n] * np.sum(g)
    dz[n] = ds / temperature
  return d, dz


def np_loss_and_grad(zs, zt, mask, divergence, k, temperature, renormalize, tail=False):
  """Token-mean loss and its gradient w.r.t. the student logits [B, T, V]."""
  b, t, v = zs.shape
  d, dz = np_per_token(zs.reshape(-1, v).astype(np.float64),
                       zt.reshape(-1, v).astype(np.float64), divergence, k, temperature,
                       renormalize, tail)
  w = np.asarray(mask, np.float64).reshape(-1)
  if w.sum() == 0:
    return 0.0, np.zeros_like(zs, np.float64)
  loss = np.sum(w * d) / w.sum()
  grad = (w / w.sum())[:, None] * dz
  return loss, grad.reshape(b, t, v)


# ------------------------------------------------------------------------------------------
# Helpers.

_LOSS_FNS = {
    losses.TOPK_REVERSE_KL: losses.topk_reverse_kl,
    losses.UNION_TOPK_REVERSE_KL: losses.union_topk_reverse_kl,
    losses.FORWARD_KL: losses.forward_kl,
}

SHAPE = (2, 6, 97)  # [B, T, V] shared by most tests so compiled programs are reused.


def _random_logits(seed, shape=SHAPE, scale=3.0):
  rng = np.random.default_rng(seed)
  zs = (rng.normal(size=shape) * scale).astype(np.float32)
  zt = (rng.normal(size=shape) * scale).astype(np.float32)
  mask = (rng.random(shape[:-1]) < 0.7).astype(np.float32)
  mask.reshape(-1)[0] = 1.0
  return zs, zt, mask


@functools.lru_cache(maxsize=None)
def _compiled(divergence, k, renormalize, tail=False):
  """Jitted (student, teacher, mask, temperature) -> (loss, d_student, d_teacher).

  Temperature and mask are traced, so one compile serves every temperature and mask.
  """
  fn = _LOSS_FNS[divergence]
  if tail:  # forward_kl has no tail argument
    fn = functools.partial(fn, tail=True)
  f = lambda s, t, m, temp: fn(s, t, m, k=k, temperature=temp, renormalize=renormalize)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def _jax_loss_and_grad(divergence, zs, zt, mask, *, k, temperature=1.0, renormalize=False,
                       tail=False):
  loss, (g_s, g_t) = _compiled(divergence, k, renormalize, tail)(zs, zt, mask, temperature)
  return float(loss), np.asarray(g_s), np.asarray(g_t)


# ------------------------------------------------------------------------------------------
# Logits forms against the reference.


@pytest.mark.parametrize("k", [1, 7, 40])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_reverse_kl_matches_numpy(k, renormalize):
  for temperature in (0.7, 1.0, 1.6):
    zs, zt, mask = _random_logits(k * 10 + int(temperature * 10))
    loss, grad, grad_t = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, zs, zt, mask, k=k,
                                            temperature=temperature,
                                            renormalize=renormalize)
    ref_loss, ref_grad = np_loss_and_grad(zs, zt, mask, losses.TOPK_REVERSE_KL, k,
                                          temperature, renormalize)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-6)
    assert np.all(grad_t == 0.0)  # the teacher gets no gradient


@pytest.mark.parametrize("divergence", [losses.UNION_TOPK_REVERSE_KL, losses.FORWARD_KL])
@pytest.mark.parametrize("k,renormalize", [(5, False), (5, True), (30, False), (0, False),
                                           (200, True)])
def test_union_and_forward_kl_match_numpy(divergence, k, renormalize):
  for temperature in (0.7, 1.3):
    zs, zt, mask = _random_logits(k + 3 + int(10 * temperature))
    loss, grad, grad_t = _jax_loss_and_grad(divergence, zs, zt, mask, k=k,
                                            temperature=temperature,
                                            renormalize=renormalize)
    ref_loss, ref_grad = np_loss_and_grad(zs, zt, mask, divergence, k, temperature,
                                          renormalize)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-6)
    assert np.all(grad_t == 0.0)


def test_union_support_counts_each_index_once():
  # Student and teacher with identical rankings: the union is just the top-k, so the union
  # loss must equal the plain top-k loss (a double count would double it).
  zs, _, mask = _random_logits(1)
  zt = zs * 0.5
  a, _, _ = _jax_loss_and_grad(losses.UNION_TOPK_REVERSE_KL, zs, zt, mask, k=5)
  b, _, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, zs, zt, mask, k=5)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert a != 0.0


def test_weighted_mask_matches_numpy():
  zs, zt, _ = _random_logits(2)
  weights = np.random.default_rng(2).random(SHAPE[:-1]).astype(np.float32)
  loss, grad, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, zs, zt, weights, k=7,
                                     temperature=0.8)
  ref_loss, ref_grad = np_loss_and_grad(zs, zt, weights, losses.TOPK_REVERSE_KL, 7, 0.8,
                                        False)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-6)


def test_k_at_or_above_vocab_is_exact_full_reverse_kl():
  zs, zt, mask = _random_logits(3)
  temperature = 0.7
  ls = _np_log_softmax(zs.astype(np.float64) / temperature)
  lt = _np_log_softmax(zt.astype(np.float64) / temperature)
  full = np.sum(np.exp(ls) * (ls - lt), axis=-1)  # exact KL(student || teacher) [B, T]
  v = SHAPE[-1]
  for k in (0, v, v + 1, 1000):
    per_token = losses.topk_reverse_kl_per_token(zs, zt, k=k, temperature=temperature)
    np.testing.assert_allclose(np.asarray(per_token), full, rtol=2e-5, atol=1e-6)
  loss, _, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, zs, zt, mask, k=0,
                                  temperature=temperature)
  np.testing.assert_allclose(loss, np.sum(mask * full) / mask.sum(), rtol=2e-5)
  # A smaller k really truncates (so the checks above can tell).
  truncated, _, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, zs, zt, mask, k=7,
                                       temperature=temperature)
  assert abs(truncated - loss) > 1e-3


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
@pytest.mark.parametrize("k,renormalize", [(5, False), (5, True), (0, False)])
def test_zero_when_student_equals_teacher(divergence, k, renormalize):
  zs, _, mask = _random_logits(4)
  loss, grad, _ = _jax_loss_and_grad(divergence, zs, zs, mask, k=k, temperature=0.7,
                                     renormalize=renormalize)
  assert abs(loss) < 1e-6
  # The gradient at equality is zero for full-vocabulary or renormalised KL, but not for
  # the truncated, unnormalised sum (it pushes mass into S); the reference agrees on both.
  _, ref_grad = np_loss_and_grad(zs, zs, mask, divergence, k, 0.7, renormalize)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-6)
  if k == 0 or renormalize:
    assert np.max(np.abs(grad)) < 1e-6
  else:
    assert np.max(np.abs(grad)) > 1e-4


def test_all_zero_mask_gives_zero_not_nan():
  zs, zt, _ = _random_logits(6)
  mask = np.zeros(SHAPE[:-1], np.float32)
  for divergence in losses.DIVERGENCES:
    loss, grad, _ = _jax_loss_and_grad(divergence, zs, zt, mask, k=5)
    assert loss == 0.0
    assert np.all(grad == 0.0)


def test_masked_out_positions_never_leak_and_nan_is_not_hidden():
  zs, zt, mask = _random_logits(7)
  mask[1, 2] = 0.0
  mask[0, 0] = 1.0
  ref, _, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, zs, zt, mask, k=5)
  bad = zs.copy()
  bad[1, 2, :] = np.inf  # garbage at a masked-out position
  loss, _, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, bad, zt, mask, k=5)
  assert loss == pytest.approx(ref, rel=1e-6)
  bad = zs.copy()
  bad[0, 0, 3] = np.nan  # NaN at a position that counts
  loss, _, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, bad, zt, mask, k=5)
  assert np.isnan(loss)


def test_minus_inf_logits_are_zero_probability_tokens():
  # Vocabulary entries with -inf logits in both models (e.g. masked padding ids) carry no
  # mass and must not produce NaN in value or gradient.
  zs, zt, mask = _random_logits(8)
  zs[..., -5:] = -np.inf
  zt[..., -5:] = -np.inf
  for k in (0, 7):
    loss, grad, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, zs, zt, mask, k=k)
    ref_loss, ref_grad = np_loss_and_grad(zs[..., :-5], zt[..., :-5], mask,
                                          losses.TOPK_REVERSE_KL, k, 1.0, False)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    np.testing.assert_allclose(grad[..., :-5], ref_grad, rtol=1e-4, atol=2e-6)
    assert np.all(grad[..., -5:] == 0.0)


def test_bf16_logits_are_computed_in_float32():
  # Distinct values exactly representable in bf16 (k/16 for |k| <= 48): no ties at the
  # top-k boundary, so the support is unambiguous.
  rng = np.random.default_rng(9)
  grid = (np.arange(SHAPE[-1]) - SHAPE[-1] // 2) / 16.0
  zs = np.stack([rng.permutation(grid) for _ in range(12)]).reshape(SHAPE)
  zt = np.stack([rng.permutation(grid) for _ in range(12)]).reshape(SHAPE)
  mask = (rng.random(SHAPE[:-1]) < 0.7).astype(np.float32)
  mask[0, 0] = 1.0
  zs16 = jnp.asarray(zs, jnp.bfloat16)
  zt16 = jnp.asarray(zt, jnp.bfloat16)
  assert np.all(np.asarray(zs16, np.float64) == zs)
  loss = jax.jit(lambda s, t: losses.topk_reverse_kl(s, t, mask, k=7, temperature=0.7))(
      zs16, zt16)
  assert loss.dtype == jnp.float32
  ref, _ = np_loss_and_grad(np.asarray(zs16, np.float64), np.asarray(zt16, np.float64), mask,
                            losses.TOPK_REVERSE_KL, 7, 0.7, False)
  np.testing.assert_allclose(float(loss), ref, rtol=2e-5)


def test_entropy_helpers_match_numpy():
  zs, _, _ = _random_logits(10)
  for temperature in (0.7, 1.0):
    ls = _np_log_softmax(zs.astype(np.float64) / temperature)
    ref = -np.sum(np.exp(ls) * ls, axis=-1)
    np.testing.assert_allclose(
        np.asarray(losses.entropy_from_logits(zs, temperature=temperature)), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.entropy_from_log_probs(ls)), ref,
                               rtol=1e-5)
  one_hot = np.full((2, 5), -np.inf)
  one_hot[:, 1] = 0.0
  assert np.all(np.asarray(losses.entropy_from_log_probs(one_hot)) == 0.0)


# ------------------------------------------------------------------------------------------
# The tail bucket (tail=True): the KL of the distributions coarse-grained to S plus a tail.

REVERSE_KLS = (losses.TOPK_REVERSE_KL, losses.UNION_TOPK_REVERSE_KL)


@pytest.mark.parametrize("divergence", REVERSE_KLS)
@pytest.mark.parametrize("k", [3, 10])
def test_reference_tail_gradient_matches_finite_differences(divergence, k):
  # The hand-derived reference gradient itself, against central differences in float64
  # (the supports stay fixed: no ties within 1e-6 in these logits).
  rng = np.random.default_rng(k)
  zs, zt = rng.normal(size=(2, 4, 30)) * 2.0  # two [N, V] float64 logits
  d, dz = np_per_token(zs, zt, divergence, k, 0.8, False, tail=True)
  eps = 1e-6
  fd = np.zeros_like(zs)
  for j in range(zs.shape[1]):
    e = np.zeros_like(zs)
    e[:, j] = eps
    fd[:, j] = (np_per_token(zs + e, zt, divergence, k, 0.8, False, tail=True)[0]
                - np_per_token(zs - e, zt, divergence, k, 0.8, False, tail=True)[0]) / (2 * eps)
  np.testing.assert_allclose(dz, fd, rtol=1e-6, atol=1e-8)
  plain, _ = np_per_token(zs, zt, divergence, k, 0.8, False)
  assert np.all(np.abs(d - plain) > 1e-3)  # the tail term is really there


@pytest.mark.parametrize("divergence", REVERSE_KLS)
@pytest.mark.parametrize("k", [1, 7, 40])
def test_tail_matches_numpy(divergence, k):
  for temperature in (0.7, 1.3):
    zs, zt, mask = _random_logits(100 + k + int(10 * temperature))
    loss, grad, grad_t = _jax_loss_and_grad(divergence, zs, zt, mask, k=k,
                                            temperature=temperature, tail=True)
    ref_loss, ref_grad = np_loss_and_grad(zs, zt, mask, divergence, k, temperature, False,
                                          tail=True)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-6)
    assert np.all(grad_t == 0.0)
    # The tail term is there, so the checks above can tell (in the gradient: the union of
    # two top-40 sets holds all but ~1e-5 of the mass).
    _, plain_grad, _ = _jax_loss_and_grad(divergence, zs, zt, mask, k=k,
                                          temperature=temperature)
    assert np.max(np.abs(grad - plain_grad)) > 2e-4
    per_token = losses.per_token_divergence(zs, zt, divergence=divergence, k=k,
                                            temperature=temperature, tail=True)
    assert np.all(np.asarray(per_token) > 0)


@pytest.mark.parametrize("divergence", REVERSE_KLS)
@pytest.mark.parametrize("k", [1, 30])
def test_tail_form_is_zero_with_zero_gradient_only_at_equality(divergence, k):
  zs, zt, mask = _random_logits(12)
  loss, grad, _ = _jax_loss_and_grad(divergence, zs, zs, mask, k=k, temperature=0.7,
                                     tail=True)
  assert abs(loss) < 1e-6
  # A true divergence is minimal at equality, so its gradient vanishes there (the truncated
  # sum's does not: test_zero_when_student_equals_teacher).
  assert np.max(np.abs(grad)) < 1e-6
  per_token = np.asarray(losses.per_token_divergence(zs, zt, divergence=divergence, k=k,
                                                     temperature=0.7, tail=True))
  ref, _ = np_per_token(zs.reshape(-1, SHAPE[-1]).astype(np.float64),
                        zt.reshape(-1, SHAPE[-1]).astype(np.float64), divergence, k, 0.7,
                        False, tail=True)
  assert np.all(ref > 1e-4) and np.all(per_token > 0)
  np.testing.assert_allclose(per_token.reshape(-1), ref, rtol=2e-5, atol=1e-6)


def test_tail_form_is_positive_where_the_truncated_sum_is_negative():
  # A teacher with the student's ranking but sharper puts more mass than the student on the
  # student's top-k: every term of the truncated sum is negative there.
  zs, _, mask = _random_logits(13, scale=1.0)
  zt = 2.0 * zs
  truncated = np.asarray(losses.topk_reverse_kl_per_token(zs, zt, k=5))
  with_tail = np.asarray(losses.topk_reverse_kl_per_token(zs, zt, k=5, tail=True))
  assert np.all(truncated < -1e-3)
  assert np.all(with_tail > 1e-3)
  ref, _ = np_per_token(zs.reshape(-1, SHAPE[-1]).astype(np.float64),
                        zt.reshape(-1, SHAPE[-1]).astype(np.float64), losses.TOPK_REVERSE_KL,
                        5, 1.0, False, tail=True)
  np.testing.assert_allclose(with_tail.reshape(-1), ref, rtol=2e-5)
  loss, grad, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, zs, zt, mask, k=5, tail=True)
  ref_loss, ref_grad = np_loss_and_grad(zs, zt, mask, losses.TOPK_REVERSE_KL, 5, 1.0, False,
                                        tail=True)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("divergence", REVERSE_KLS)
def test_tail_over_the_full_vocabulary_is_the_full_kl(divergence):
  zs, zt, mask = _random_logits(14)
  v = SHAPE[-1]
  ref_loss, ref_grad = np_loss_and_grad(zs, zt, mask, divergence, 0, 0.7, False)
  for k in (0, v, v + 3):
    loss, grad, _ = _jax_loss_and_grad(divergence, zs, zt, mask, k=k, temperature=0.7,
                                       tail=True)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-6)
  # A support holding every token of nonzero probability leaves a tail of mass 0 (-inf
  # log-mass): it adds 0, with no NaN in value or gradient.
  zs[..., -5:] = -np.inf
  zt[..., -5:] = -np.inf
  ref_loss, ref_grad = np_loss_and_grad(zs[..., :-5], zt[..., :-5], mask, divergence, 0, 0.7,
                                        False)
  loss, grad, _ = _jax_loss_and_grad(divergence, zs, zt, mask, k=v - 5, temperature=0.7,
                                     tail=True)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  np.testing.assert_allclose(grad[..., :-5], ref_grad, rtol=1e-4, atol=2e-6)
  assert np.all(grad[..., -5:] == 0.0)


@pytest.mark.parametrize("tiny", ["student", "teacher"])
def test_tail_stays_precise_when_the_support_holds_almost_all_mass(tiny):
  # One model puts ~1e-18 of its mass outside the student's top-k: 1 - sum_S p is then 0 or
  # less in float32, and a form built on it would give log 0 (inf or NaN). The log-sum-exp
  # over the complement keeps it. With the teacher's tail tiny, the tail term is the larger
  # part of the loss; with the student's, it is ~0 but its gradient on S is not.
  rng = np.random.default_rng(15)
  k = 8
  base = rng.normal(size=SHAPE).astype(np.float32)
  top = np.argsort(-base, axis=-1)[..., :k]
  peaked = base - 45.0
  np.put_along_axis(peaked, top, np.take_along_axis(base, top, -1), axis=-1)
  p32 = np.exp(peaked - np.log(np.sum(np.exp(peaked), -1, keepdims=True)))
  assert np.min(1.0 - np.sum(np.take_along_axis(p32, top, -1), -1, dtype=np.float32)) <= 0
  zs, zt = ((peaked, (rng.normal(size=SHAPE) * 2.0).astype(np.float32)) if tiny == "student"
            else (base, peaked))
  mask = np.ones(SHAPE[:-1], np.float32)
  loss, grad, _ = _jax_loss_and_grad(losses.TOPK_REVERSE_KL, zs, zt, mask, k=k, tail=True)
  ref_loss, ref_grad = np_loss_and_grad(zs, zt, mask, losses.TOPK_REVERSE_KL, k, 1.0, False,
                                        tail=True)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5)
  if tiny == "teacher":
    truncated, _ = np_loss_and_grad(zs, zt, mask, losses.TOPK_REVERSE_KL, k, 1.0, False)
    assert ref_loss - truncated > 10.0


# ------------------------------------------------------------------------------------------
# Hidden-state (chunked) form against the logits form.


def _hidden_inputs(seed, b=2, t=9, h=12, h_teacher=9, v=61, dtype=np.float32):
  rng = np.random.default_rng(seed)
  hs = rng.normal(size=(b, t, h)).astype(dtype)
  ws = (rng.normal(size=(v, h)) * 0.8).astype(dtype)
  ht = rng.normal(size=(b, t, h_teacher)).astype(dtype)
  wt = (rng.normal(size=(v, h_teacher)) * 0.8).astype(dtype)
  mask = (rng.random((b, t)) < 0.75).astype(np.float32)
  mask[0, 0] = 1.0
  return [jnp.asarray(x) for x in (hs, ws, ht, wt)] + [jnp.asarray(mask)]


def _logits(h, w):
  return jnp.einsum("bth,vh->btv", h, w, preferred_element_type=jnp.float32)


def _plain_and_chunked(divergence, chunks, hs, ws, ht, wt, mask, **kw):
  """(loss, grads) of the plain form, and of the chunked form for each
  (chunk_size, vocab_chunk_size) pair in `chunks`."""
  fn = _LOSS_FNS[divergence]

  def plain(hs, ws, ht, wt):
    return fn(_logits(hs, ws), _logits(ht, wt), mask, **kw)

  def chunked(hs, ws, ht, wt, chunk_size, vocab_chunk_size):
    stats = losses.per_token_divergence_from_hidden(
        hs, ws, ht, wt, divergence=divergence, chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size, **kw)
    return losses.masked_mean(stats.divergence, mask)

  args = (hs, ws, ht, wt)
  out_p = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2, 3)))(*args)
  grad_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)), static_argnums=(4, 5))
  return out_p, [grad_c(*args, c, vc) for c, vc in chunks]


def test_chunked_topk_reverse_kl_equals_plain():
  # B*T = 18 tokens and V = 61: token chunks of 4 and 5 and vocabulary tiles of 7 and 16
  # divide neither (the last tile overlaps the one before it); 64 and 100 exceed them.
  hs, ws, ht, wt, mask = _hidden_inputs(20)
  kw = dict(k=7, temperature=0.7, renormalize=False)
  chunks = ((1, 61), (4, 16), (5, 7), (64, 100))
  (lp, gp), outs = _plain_and_chunked(losses.TOPK_REVERSE_KL, chunks, hs, ws, ht, wt, mask,
                                      **kw)
  for chunk, (lc, gc) in zip(chunks, outs):
    np.testing.assert_allclose(float(lc), float(lp), rtol=1e-5, err_msg=str(chunk))
    for a, b in zip(gc[:2], gp[:2]):
      assert np.max(np.abs(np.asarray(b))) > 1e-4
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                 err_msg=str(chunk))
    for g in gc[2:]:  # no gradient to the teacher
      assert np.all(np.asarray(g) == 0.0)
  direct = losses.topk_reverse_kl_from_hidden(hs, ws, ht, wt, mask, chunk_size=5,
                                              vocab_chunk_size=16, **kw)
  np.testing.assert_allclose(float(direct), float(lp), rtol=1e-5)


@pytest.mark.parametrize("divergence,k,renormalize,chunk_size",
                         [(losses.TOPK_REVERSE_KL, 7, True, 4),
                          (losses.TOPK_REVERSE_KL, 0, False, 5),
                          (losses.UNION_TOPK_REVERSE_KL, 6, False, 7),
                          (losses.UNION_TOPK_REVERSE_KL, 6, True, 4),
                          (losses.FORWARD_KL, 6, False, 5),
                          (losses.FORWARD_KL, 0, True, 4)])
def test_chunked_variants_equal_plain(divergence, k, renormalize, chunk_size):
  hs, ws, ht, wt, mask = _hidden_inputs(30 + k + chunk_size)
  (lp, gp), [(lc, gc)] = _plain_and_chunked(divergence, [(chunk_size, 16)], hs, ws, ht, wt,
                                            mask, k=k, temperature=1.3,
                                            renormalize=renormalize)
  np.testing.assert_allclose(float(lc), float(lp), rtol=1e-5)
  for a, b in zip(gc[:2], gp[:2]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for g in gc[2:]:
    assert np.all(np.asarray(g) == 0.0)


def test_chunked_matches_numpy_reference_through_the_unembedding():
  # Independent of the logits form: the NumPy gradient w.r.t. the logits, pushed through
  # logits = h @ W^T by hand.
  hs, ws, ht, wt, mask = _hidden_inputs(40)
  zs = np.einsum("bth,vh->btv", np.float64(hs), np.float64(ws))
  zt = np.einsum("bth,vh->btv", np.float64(ht), np.float64(wt))
  ref_loss, dz = np_loss_and_grad(zs, zt, np.asarray(mask), losses.TOPK_REVERSE_KL, 7, 0.7,
                                  False)
  ref_dh = np.einsum("btv,vh->bth", dz, np.float64(ws))
  ref_dw = np.einsum("btv,bth->vh", dz, np.float64(hs))
  f = lambda hs, ws: losses.topk_reverse_kl_from_hidden(hs, ws, ht, wt, mask, k=7,
                                                        temperature=0.7, chunk_size=4,
                                                        vocab_chunk_size=16)
  loss, (dh, dw) = jax.value_and_grad(f, argnums=(0, 1))(hs, ws)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=2e-4, atol=2e-6)


def test_chunked_bf16_inputs_close_to_plain():
  hs, ws, ht, wt, mask = _hidden_inputs(41, h=32, h_teacher=32, v=128, dtype=np.float32)
  hs, ws, ht, wt = (x.astype(jnp.bfloat16) for x in (hs, ws, ht, wt))
  (lp, gp), [(lc, gc)] = _plain_and_chunked(losses.TOPK_REVERSE_KL, [(5, 48)], hs, ws, ht,
                                            wt, mask, k=16, temperature=0.7)
  assert lc.dtype == jnp.float32
  assert gc[0].dtype == jnp.bfloat16 and gc[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(float(lc), float(lp), rtol=1e-5)
  for a, b in zip(gc[:2], gp[:2]):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b))


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_chunked_bf16_unembedding_gradient_is_the_direct_form_to_one_rounding(monkeypatch,
                                                                              chunk_size):
  """In 16-bit (top-k support) the backward multiplies each tile's unembedding gradient from
  dz^T built from logits computed transposed (a dot XLA:CPU runs in bf16). Against the
  direct form (dz^T hs from dz, float32 operands there): the same products up to the
  logits' float32 summation order, summed in another order, so each bf16 element is within
  one rounding, and the hidden states' gradient is bit for bit. One token chunk (64 > 18
  tokens) and several."""
  from oel_jax.losses import chunked
  hs, ws, ht, wt, mask = _hidden_inputs(43, h=32, h_teacher=24, v=128, dtype=np.float32)
  hs, ws, ht, wt = (x.astype(jnp.bfloat16) for x in (hs, ws, ht, wt))

  def grads():
    f = lambda hs, ws: losses.topk_reverse_kl_from_hidden(
        hs, ws, ht, wt, mask, k=16, temperature=0.7, chunk_size=chunk_size,
        vocab_chunk_size=48)
    return [np.asarray(g, np.float32) for g in jax.jit(jax.grad(f, argnums=(0, 1)))(hs, ws)]

  assert chunked._grad_tile_transposed(jnp.bfloat16)
  dh, dw = grads()
  monkeypatch.setattr(chunked, "_grad_tile_transposed", lambda dtype: False)
  dh_direct, dw_direct = grads()
  np.testing.assert_array_equal(dh, dh_direct)
  assert np.max(np.abs(dw_direct)) > 1e-4 and np.count_nonzero(dw_direct) > 0.9 * dw.size
  np.testing.assert_allclose(dw, dw_direct, rtol=2**-7, atol=1e-30)


def test_chunked_entropies_match_logits_form():
  hs, ws, ht, wt, _ = _hidden_inputs(42)
  stats = losses.per_token_divergence_from_hidden(hs, ws, ht, wt, k=7, temperature=0.7,
                                                  chunk_size=4, vocab_chunk_size=16,
                                                  with_entropy=True)
  np.testing.assert_allclose(
      np.asarray(stats.student_entropy),
      np.asarray(losses.entropy_from_logits(_logits(hs, ws), temperature=0.7)), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(stats.teacher_entropy),
      np.asarray(losses.entropy_from_logits(_logits(ht, wt), temperature=0.7)), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(stats.divergence),
      np.asarray(losses.topk_reverse_kl_per_token(_logits(hs, ws), _logits(ht, wt), k=7,
                                                  temperature=0.7)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence,k,chunk_size", [(losses.TOPK_REVERSE_KL, 7, 4),
                                                     (losses.TOPK_REVERSE_KL, 0, 5),
                                                     (losses.UNION_TOPK_REVERSE_KL, 6, 7)])
def test_chunked_tail_equals_plain(divergence, k, chunk_size):
  hs, ws, ht, wt, mask = _hidden_inputs(50 + k + chunk_size)
  chunks = ((chunk_size, 16), (64, 100))
  (lp, gp), outs = _plain_and_chunked(divergence, chunks, hs, ws, ht, wt, mask, k=k,
                                      temperature=0.7, tail=True)
  for chunk, (lc, gc) in zip(chunks, outs):
    np.testing.assert_allclose(float(lc), float(lp), rtol=1e-5, err_msg=str(chunk))
    for a, b in zip(gc[:2], gp[:2]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                 err_msg=str(chunk))
    for g in gc[2:]:
      assert np.all(np.asarray(g) == 0.0)
  (lp0, gp0), _ = _plain_and_chunked(divergence, (), hs, ws, ht, wt, mask, k=k,
                                     temperature=0.7)
  if k:  # the tail term is there (so the checks above can tell)
    assert abs(float(lp) - float(lp0)) > 1e-3
    assert np.max(np.abs(np.asarray(gp[1]) - np.asarray(gp0[1]))) > 1e-3
  else:  # the full vocabulary has no tail
    np.testing.assert_allclose(float(lp), float(lp0), rtol=1e-6)


def test_chunked_tail_matches_numpy_reference_through_the_unembedding():
  hs, ws, ht, wt, mask = _hidden_inputs(43)
  zs = np.einsum("bth,vh->btv", np.float64(hs), np.float64(ws))
  zt = np.einsum("bth,vh->btv", np.float64(ht), np.float64(wt))
  ref_loss, dz = np_loss_and_grad(zs, zt, np.asarray(mask), losses.TOPK_REVERSE_KL, 7, 0.7,
                                  False, tail=True)
  ref_dh = np.einsum("btv,vh->bth", dz, np.float64(ws))
  ref_dw = np.einsum("btv,bth->vh", dz, np.float64(hs))
  f = lambda hs, ws: losses.topk_reverse_kl_from_hidden(hs, ws, ht, wt, mask, k=7,
                                                        temperature=0.7, tail=True,
                                                        chunk_size=4, vocab_chunk_size=16)
  loss, (dh, dw) = jax.value_and_grad(f, argnums=(0, 1))(hs, ws)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("divergence,k", [(losses.TOPK_REVERSE_KL, 7),
                                          (losses.UNION_TOPK_REVERSE_KL, 6),
                                          (losses.FORWARD_KL, 6),
                                          (losses.TOPK_REVERSE_KL, 0)])
def test_chunked_support_masses_match_numpy(divergence, k):
  hs, ws, ht, wt, _ = _hidden_inputs(44)
  temperature = 0.7
  stats_of = lambda hs: losses.per_token_divergence_from_hidden(
      hs, ws, ht, wt, divergence=divergence, k=k, temperature=temperature, chunk_size=4,
      vocab_chunk_size=16)
  stats = stats_of(hs)
  v = ws.shape[0]
  ls = _np_log_softmax(np.einsum("bth,vh->btv", np.float64(hs), np.float64(ws)).reshape(-1, v)
                       / temperature)
  lt = _np_log_softmax(np.einsum("bth,vh->btv", np.float64(ht), np.float64(wt)).reshape(-1, v)
                       / temperature)
  sup = np.stack([_np_support(a, b, divergence, k) for a, b in zip(ls, lt)])
  ref_s = np.sum(np.where(sup, np.exp(ls), 0.0), axis=-1)
  ref_t = np.sum(np.where(sup, np.exp(lt), 0.0), axis=-1)
  got_s = np.asarray(stats.student_support_mass).reshape(-1)
  got_t = np.asarray(stats.teacher_support_mass).reshape(-1)
  if k == 0:
    assert np.all(got_s == 1.0) and np.all(got_t == 1.0)
  else:
    assert min(ref_s) < 0.9 and min(ref_t) < 0.9  # truncation that matters
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-5)
    np.testing.assert_allclose(got_t, ref_t, rtol=1e-5)
  # Statistics only: no gradient flows from them.
  grad = jax.grad(lambda hs: jnp.sum(stats_of(hs).student_support_mass))(hs)
  assert np.all(np.asarray(grad) == 0.0)


def test_chunked_never_materialises_full_logits():
  # Compile only: the chunked value-and-gradient program's temporaries stay below one
  # [N, V] float32 logits buffer, while the plain form's exceed several.
  n, v, h, chunk = 1024, 8192, 32, 64
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  mask = jnp.ones((1, n), jnp.float32)

  def chunked(hs, ws, ht, wt):
    return losses.topk_reverse_kl_from_hidden(hs, ws, ht, wt, mask, k=32, chunk_size=chunk,
                                              vocab_chunk_size=1024)

  def plain(hs, ws, ht, wt):
    return losses.topk_reverse_kl(_logits(hs, ws), _logits(ht, wt), mask, k=32)

  args = (spec(1, n, h), spec(v, h), spec(1, n, h), spec(v, h))
  temp = {}
  for name, f in (("chunked", chunked), ("plain", plain)):
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = n * v * 4
  assert temp["plain"] > 2 * logits_bytes
  assert temp["chunked"] < logits_bytes / 2, temp


# ------------------------------------------------------------------------------------------
# Input validation.


def test_bad_inputs_raise_clear_errors():
  zs = np.zeros((2, 3, 10), np.float32)
  mask = np.ones((2, 3), np.float32)
  with pytest.raises(ValueError, match=r"\(2, 3, 10\).*\(2, 3, 11\)"):
    losses.topk_reverse_kl(zs, np.zeros((2, 3, 11), np.float32), mask)
  with pytest.raises(ValueError, match=r"mask.*\(2, 3\).*\(3, 2\)"):
    losses.topk_reverse_kl(zs, zs, np.ones((3, 2)))
  with pytest.raises(ValueError, match="k must be >= 0.*-1"):
    losses.topk_reverse_kl(zs, zs, mask, k=-1)
  with pytest.raises(ValueError, match="k must be a Python int"):
    losses.topk_reverse_kl(zs, zs, mask, k=2.5)
  for bad_t in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="temperature"):
      losses.topk_reverse_kl(zs, zs, mask, temperature=bad_t)
  with pytest.raises(ValueError, match="floating dtype"):
    losses.topk_reverse_kl(np.zeros((2, 3, 10), np.int32), zs, mask)
  with pytest.raises(ValueError, match="divergence must be one of"):
    losses.per_token_divergence(zs, zs, divergence="js")
  with pytest.raises(ValueError, match=r"temperature"):
    losses.entropy_from_logits(zs, temperature=0)
  with pytest.raises(ValueError, match="tail=True cannot be combined with renormalize"):
    losses.topk_reverse_kl(zs, zs, mask, tail=True, renormalize=True)
  with pytest.raises(ValueError, match="reverse-KL divergences"):
    losses.per_token_divergence(zs, zs, divergence=losses.FORWARD_KL, tail=True)
  with pytest.raises(ValueError, match="tail must be a bool"):
    losses.topk_reverse_kl(zs, zs, mask, tail="yes")


def test_bad_hidden_inputs_raise_clear_errors():
  hs = np.zeros((2, 3, 8), np.float32)
  ws = np.zeros((10, 8), np.float32)
  mask = np.ones((2, 3), np.float32)
  f = losses.topk_reverse_kl_from_hidden
  with pytest.raises(ValueError, match=r"student_hidden width 8.*\(10, 6\)"):
    f(hs, np.zeros((10, 6), np.float32), hs, ws, mask)
  with pytest.raises(ValueError, match=r"vocabularies differ.*\(10, 8\).*\(12, 8\)"):
    f(hs, ws, hs, np.zeros((12, 8), np.float32), mask)
  with pytest.raises(ValueError, match=r"same leading"):
    f(hs, ws, np.zeros((2, 4, 8), np.float32), ws, mask)
  with pytest.raises(ValueError, match=r"mask.*\(2, 3\).*\(2, 4\)"):
    f(hs, ws, hs, ws, np.ones((2, 4)))
  with pytest.raises(ValueError, match=r"\[V, H\]"):
    f(hs, ws.T[None], hs, ws, mask)
  for bad in (0, -3, 2.0):
    with pytest.raises(ValueError, match="chunk_size"):
      f(hs, ws, hs, ws, mask, chunk_size=bad)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
      f(hs, ws, hs, ws, mask, vocab_chunk_size=bad)
  with pytest.raises(ValueError, match="k must be >= 0"):
    f(hs, ws, hs, ws, mask, k=-2)
  with pytest.raises(ValueError, match="tail=True cannot be combined with renormalize"):
    f(hs, ws, hs, ws, mask, tail=True, renormalize=True)
  with pytest.raises(ValueError, match="reverse-KL divergences"):
    losses.per_token_divergence_from_hidden(hs, ws, hs, ws, divergence=losses.FORWARD_KL,
                                            tail=True)
