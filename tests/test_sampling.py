"""The sampler against transformers' generate and against the sampling formula in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import make_hf_model
from oel_jax import chat, parallel, tiny
from oel_jax.models import load_hf
from oel_jax.sampling import Sampler, bucket_size, common_prefix_length

VOCAB = 128
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42], [3, 4], [9, 9, 9, 1, 2], [77], [20] * 17]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  hf = make_hf_model(vocab=VOCAB, heads=8, kv_heads=2, tied=False, theta=5e6, seed=4)
  path = tmp_path_factory.mktemp("sampler")
  hf.save_pretrained(path)
  return hf, path, load_hf(path)


def _hf_greedy(hf, prompt, new, eos):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                      max_new_tokens=new, do_sample=False, eos_token_id=list(eos),
                      pad_token_id=0)
  tokens = out[0, len(prompt):].tolist()
  for i, t in enumerate(tokens):  # transformers pads after a stop
    if t in eos:
      return tokens[:i + 1]
  return tokens


def test_greedy_equals_transformers(ref):
  hf, _, model = ref
  new = 24
  # Stop tokens picked from the unconstrained greedy runs, so some rows stop early.
  free = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128)
  runs = free.generate(PROMPTS, max_new_tokens=new, temperature=0).tokens
  eos = (runs[0][5], runs[2][2])
  sampler = Sampler(model, eos_ids=eos, pad_id=0, max_seq_len=128)
  out = sampler.generate(PROMPTS, max_new_tokens=new, temperature=0)
  assert "stop" in out.finish_reasons and "length" in out.finish_reasons
  for prompt, tokens, reason in zip(PROMPTS, out.tokens, out.finish_reasons):
    assert tokens == _hf_greedy(hf, prompt, new, eos)
    assert (reason == "stop") == (tokens[-1] in eos)
    assert reason == "stop" or len(tokens) == new


def test_batched_equals_alone(ref):
  _, _, model = ref
  sampler = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128)
  batched = sampler.generate(PROMPTS, max_new_tokens=10, temperature=0)
  for i, prompt in enumerate(PROMPTS):
    alone = sampler.generate([prompt], max_new_tokens=10, temperature=0)
    assert alone.tokens[0] == batched.tokens[i]
    np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[i], atol=1e-5)
  # Finer buckets (prompts of 17 tokens padded to 24, not 32; 5 rows to 6, not 8): the same.
  finer = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128, min_prompt_bucket=16,
                  buckets_per_doubling=2)
  again = finer.generate(PROMPTS, max_new_tokens=10, temperature=0)
  assert again.tokens == batched.tokens
  np.testing.assert_allclose(np.concatenate(again.logprobs), np.concatenate(batched.logprobs),
                             atol=1e-5)
  assert [bucket_size(n, 16, 2) for n in (17, 5, 33)] == [24, 16, 48]


def _expected_distribution(logits, temperature, top_k, top_p):
  """Temperature, then top-k, then top-p, in float64 NumPy (transformers' definition)."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros_like(z, bool)
  keep[order[: top_k if top_k > 0 else len(z)]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  sorted_p = p[order]
  mass_before = np.cumsum(sorted_p) - sorted_p
  nucleus = np.zeros_like(keep)
  nucleus[order[mass_before < top_p]] = True
  p = np.where(keep & nucleus, p, 0.0)
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0),    # plain sampling over the whole vocabulary
    (0.7, 20, 0.8),   # the paper's evaluation setting
    (1.3, 0, 0.9),    # nucleus without top-k (full sort)
    (0.5, 5, 1.0),    # top-k only
])
def test_sampling_distribution_and_logprobs(ref, temperature, top_k, top_p):
  hf, _, model = ref
  prompt = PROMPTS[1]
  with torch.no_grad():
    logits = hf(torch.tensor([prompt])).logits[0, -1].numpy()
  expected = _expected_distribution(logits, temperature, top_k, top_p)
  sampler = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=64)
  draws, logprobs = [], []
  for seed in range(4):
    out = sampler.generate([prompt] * 1024, max_new_tokens=1, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed)
    draws += [t[0] for t in out.tokens]
    logprobs += [lp[0] for lp in out.logprobs]
  draws, logprobs = np.asarray(draws), np.asarray(logprobs)
  # Nothing outside the support, and every reported logprob is exactly log p(token).
  assert expected[draws].min() > 0
  np.testing.assert_allclose(logprobs, np.log(expected[draws]), atol=2e-5)
  # Total variation between empirical and expected frequencies: with n = 4096 draws over
  # m tokens of mass, E[TV] <= 0.5 * sqrt(m / n) (Cauchy-Schwarz); the bound allows 1.5x.
  support = int((expected > 0).sum())
  empirical = np.bincount(draws, minlength=VOCAB) / len(draws)
  tv = 0.5 * np.abs(empirical - expected).sum()
  assert tv < 0.75 * np.sqrt(support / len(draws)), (tv, support)
  if top_k or top_p < 1:
    assert support < VOCAB  # the restriction really removed tokens in this case


def test_seeds(ref):
  _, _, model = ref
  sampler = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128)
  kw = dict(max_new_tokens=12, temperature=1.0)
  a = sampler.generate(PROMPTS, seed=3, **kw)
  b = sampler.generate(PROMPTS, seed=3, **kw)
  c = sampler.generate(PROMPTS, seed=4, **kw)
  assert a.tokens == b.tokens and a.logprobs == b.logprobs
  assert a.tokens != c.tokens


def test_no_recompilation_in_steady_state(ref):
  _, path, model = ref
  sampler = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=256)
  sampler.generate(PROMPTS, max_new_tokens=16, temperature=0)
  assert sampler.num_compilations == 1
  for temperature, top_k, top_p in [(0.7, 20, 0.8), (1.0, 0, 1.0), (1.3, 0, 0.5),
                                    (0.2, 300, 0.9)]:
    sampler.generate(PROMPTS, max_new_tokens=16, temperature=temperature, top_k=top_k,
                     top_p=top_p)
  # Budgets within the same bucket, prompt lengths within the same bucket.
  sampler.generate([p + [3] * 5 for p in PROMPTS], max_new_tokens=9, temperature=0)
  new_model = load_hf(path)
  new_model.embed[...] = new_model.embed[...] * 1.5
  sampler.update_weights(new_model)
  sampler.generate(PROMPTS, max_new_tokens=16, temperature=0)
  assert sampler.num_compilations == 1
  # No compile without a trace either (e.g. committed vs uncommitted weights).
  assert sampler._jitted._cache_size() == 1  # pylint: disable=protected-access

  # A game loop whose prompts grow turn by turn and whose batch shrinks compiles a
  # bounded number of programs: one per (batch bucket, prompt bucket).
  prompts = [[7] * 10 for _ in range(5)]
  for turn in range(6):
    prompts = [p + [9] * 20 for p in prompts[: 5 - turn // 2]]
    sampler.generate(prompts, max_new_tokens=16, temperature=0.7)
  assert sampler.num_compilations <= 1 + 4


def test_update_weights_takes_effect(ref):
  _, path, model = ref
  other = load_hf(path)
  other.layers[0].mlp.down_proj[...] = other.layers[0].mlp.down_proj[...] * -3.0
  sampler = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128)
  before = sampler.generate(PROMPTS, max_new_tokens=12, temperature=0)
  sampler.update_weights(other)
  after = sampler.generate(PROMPTS, max_new_tokens=12, temperature=0)
  fresh = Sampler(other, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128)
  assert after.tokens == fresh.generate(PROMPTS, max_new_tokens=12, temperature=0).tokens
  assert after.tokens != before.tokens
  wrong = load_hf(path, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="update_weights: embed is .* bfloat16"):
    sampler.update_weights(wrong)


def test_sharded_model_generates_the_same(ref):
  _, path, model = ref
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tp=2))
  sharded = load_hf(path, mesh=mesh)
  single = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128)
  multi = Sampler(sharded, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128, mesh=mesh)
  a = single.generate(PROMPTS, max_new_tokens=10, temperature=0)
  b = multi.generate(PROMPTS, max_new_tokens=10, temperature=0)
  assert a.tokens == b.tokens
  np.testing.assert_allclose(np.concatenate(a.logprobs), np.concatenate(b.logprobs),
                             atol=1e-4)


def test_bad_input(ref):
  _, _, model = ref
  sampler = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=32)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sampler.generate([[1], []], max_new_tokens=4)
  with pytest.raises(ValueError, match="prompt 0 has 30 tokens.*max_seq_len=32"):
    sampler.generate([[1] * 30], max_new_tokens=4)
  with pytest.raises(ValueError, match="prompt 1 holds a token id outside"):
    sampler.generate([[1], [VOCAB + 5]], max_new_tokens=4)
  with pytest.raises(ValueError, match="top_p"):
    sampler.generate([[1]], max_new_tokens=4, top_p=0.0)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    Sampler(model, eos_ids=[VOCAB], pad_id=0, max_seq_len=32)


def test_chat_generation_splits_reasoning():
  tokenizer = tiny.load_tiny_tokenizer()
  sampler = Sampler(tiny.tiny_model(), eos_ids=chat.stop_token_ids(tokenizer),
                    pad_id=tokenizer.pad_token_id, max_seq_len=256)
  conversations = [[{"role": "user", "content": "Which way? Answer [up] or [down]."}],
                   [{"role": "user", "content": "Hi"}]]
  out = sampler.generate_chat(tokenizer, conversations, enable_thinking=False,
                              max_new_tokens=12, temperature=0)
  assert len(out) == 2
  for completion, conversation in zip(out, conversations):
    ids = chat.encode_chat(tokenizer, conversation, enable_thinking=False)
    raw = sampler.generate([ids], max_new_tokens=12, temperature=0)
    assert completion.tokens == raw.tokens[0]
    text = tokenizer.decode(raw.tokens[0], skip_special_tokens=True)
    assert completion.text == text
    assert (completion.reasoning, completion.answer) == chat.split_reasoning(text)


def test_inverse_cdf_draw_across_blocks():
  """`draw` over a vocabulary of several 1024-blocks: right support, frequencies, logprobs."""
  from oel_jax.sampling import draw
  rng = np.random.default_rng(0)
  v = 5000
  logits = rng.normal(size=v) * 2
  logits[rng.choice(v, 4000, replace=False)] = -np.inf  # zero-probability entries
  logits[4999] = 3.0  # mass in the last, partial block
  logprobs = logits - np.logaddexp.reduce(logits[np.isfinite(logits)])
  expected = np.exp(logprobs)
  n = 16_000
  # Unnormalised (shifted) logits: draw normalises itself.
  batch = np.broadcast_to(logits + 7.0, (n, v)).astype(np.float32)
  u = jax.random.uniform(jax.random.key(1), (n,))
  picks, lp = jax.jit(draw)(u, jnp.asarray(batch))
  picks, lp = np.asarray(picks), np.asarray(lp)
  assert expected[picks].min() > 0
  np.testing.assert_allclose(lp, logprobs[picks], atol=2e-5)
  empirical = np.bincount(picks, minlength=v) / n
  support = int((expected > 0).sum())
  tv = 0.5 * np.abs(empirical - expected).sum()
  assert tv < 0.75 * np.sqrt(support / n), tv
  per_block = lambda p: np.add.reduceat(p, np.arange(0, v, 1024))
  np.testing.assert_allclose(per_block(empirical), per_block(expected), atol=0.01)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 0.95),   # nucleus wider than the top 256: the full-sort fallback
    (1.0, 0, 0.3),    # nucleus inside the top 256: the partial-sort path
    (0.8, 300, 0.9),  # top-k above the partial-sort cap: full sort
    (1.2, 100, 1.0),  # top-k above the small cap
    (0.7, 20, 0.8),   # the small cap
])
def test_sample_next_on_a_large_vocabulary(temperature, top_k, top_p):
  """`sample_next` at V = 3000 (above the 256-candidate cap) against the NumPy formula."""
  from oel_jax.sampling import sample_next
  v, n = 3000, 8192
  logits = np.random.default_rng(1).normal(size=v).astype(np.float32)
  expected = _expected_distribution(logits, temperature, top_k, top_p)
  u = jax.random.uniform(jax.random.key(2), (n,))
  tokens, lp = jax.jit(sample_next)(u, jnp.broadcast_to(jnp.asarray(logits), (n, v)),
                                    jnp.float32(temperature), jnp.int32(top_k),
                                    jnp.float32(top_p))
  tokens, lp = np.asarray(tokens), np.asarray(lp)
  assert expected[tokens].min() > 0
  np.testing.assert_allclose(lp, np.log(expected[tokens]), atol=2e-5)
  support = int((expected > 0).sum())
  tv = 0.5 * np.abs(np.bincount(tokens, minlength=v) / n - expected).sum()
  assert tv < 0.75 * np.sqrt(support / n), (tv, support)


def test_greedy_breaks_ties_like_argmax():
  from oel_jax.sampling import sample_next
  logits = jnp.asarray([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -3.0, -1.0, 0.5]])
  tokens, lp = sample_next(jnp.zeros(3), logits, jnp.float32(0), jnp.int32(0),
                           jnp.float32(1))
  np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), -1))
  np.testing.assert_allclose(lp, np.take_along_axis(
      np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[:, None], -1)[:, 0],
      atol=1e-6)


def test_per_prompt_seeds_do_not_depend_on_the_batch(ref):
  """With one seed per prompt, a prompt's sample is the same alone, batched, or moved."""
  _, _, model = ref
  sampler = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128)
  kw = dict(max_new_tokens=8, temperature=1.0)
  seeds = [11, 2 ** 40 + 5, 7, 2 ** 64 - 1, 0]
  batched = sampler.generate(PROMPTS, seed=seeds, **kw)
  moved = sampler.generate(PROMPTS[::-1], seed=seeds[::-1], **kw)
  for i, prompt in enumerate(PROMPTS):
    alone = sampler.generate([prompt], seed=[seeds[i]], **kw)
    assert alone.tokens[0] == batched.tokens[i] == moved.tokens[len(PROMPTS) - 1 - i]
  other = sampler.generate(PROMPTS, seed=[s + 1 for s in seeds[:3]] + seeds[3:], **kw)
  assert other.tokens[3:] == batched.tokens[3:] and other.tokens[:3] != batched.tokens[:3]
  with pytest.raises(ValueError, match="2 seeds for 5 prompts"):
    sampler.generate(PROMPTS, seed=[1, 2], **kw)
  with pytest.raises(ValueError, match="seed 1 must be an integer"):
    sampler.generate(PROMPTS[:2], seed=[1, -2], **kw)


def _buffers(params) -> list[list[int]]:
  """Each parameter's device buffers (one per addressable shard), by address."""
  leaves = jax.tree.leaves(params)
  return [[s.data.unsafe_buffer_pointer() for s in x.addressable_shards] for x in leaves]


@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh_2x2x2"])
def test_update_weights_shares_the_models_buffers(ref, sharded):
  """A weight sync is a reference swap, not a copy: consolidation syncs the student into the
  sampler after every optimizer step and the pool on every `sampler(path)`, so a copy there
  would cost a full parameter copy each time."""
  _, path, _ = ref
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tp=2)) if sharded else None
  first, second = load_hf(path, mesh=mesh), load_hf(path, mesh=mesh)
  second.layers[0].mlp.down_proj[...] = second.layers[0].mlp.down_proj[...] * -3.0
  sampler = Sampler(first, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128, mesh=mesh)
  held = lambda: _buffers(sampler._params)  # pylint: disable=protected-access
  assert {len(b) for b in _buffers(nnx.state(first))} == {8 if sharded else 1}
  assert held() == _buffers(nnx.state(first))
  before = sampler.generate(PROMPTS, max_new_tokens=8, temperature=0).tokens
  sampler.update_weights(second)
  assert held() == _buffers(nnx.state(second))
  assert sampler.generate(PROMPTS, max_new_tokens=8, temperature=0).tokens != before
  sampler.update_weights(nnx.state(first))  # a state, as consolidation passes it
  assert held() == _buffers(nnx.state(first))
  assert sampler.generate(PROMPTS, max_new_tokens=8, temperature=0).tokens == before


def test_update_weights_moves_weights_placed_elsewhere(ref):
  """Weights on another placement are moved onto the sampler's (the one case that copies)."""
  _, path, _ = ref
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tp=2))
  sampler = Sampler(load_hf(path, mesh=mesh), eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128,
                    mesh=mesh)
  # pylint: disable=protected-access
  before = [x.sharding for x in jax.tree.leaves(sampler._params)]
  sampler.update_weights(load_hf(path))  # on one device
  assert [x.sharding for x in jax.tree.leaves(sampler._params)] == before
  assert {len(b) for b in _buffers(sampler._params)} == {8}
  # pylint: enable=protected-access


def _knowledge_prompts(seed: int = 0) -> list[list[int]]:
  """Prompts sharing a 45-token prefix (a knowledge text), then suffixes of 1 to 19 tokens;
  two suffixes start alike, so the common prefix is not where any row's suffix starts."""
  rng = np.random.default_rng(seed)
  prefix = rng.integers(1, VOCAB - 1, 45).tolist()
  suffixes = [rng.integers(1, VOCAB - 1, n).tolist() for n in (1, 7, 19, 3, 12)]
  suffixes[4][:2] = suffixes[1][:2]
  return [prefix + s for s in suffixes]


def test_shared_prefix_equals_whole_prompts(ref):
  """Prefilling the common prefix once gives the whole-prompt prefill's tokens, greedy and
  sampled with the same seeds, with rows whose own parts differ in length and some stops."""
  _, _, model = ref
  prompts = _knowledge_prompts()
  free = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128, min_prompt_bucket=8)
  runs = free.generate(prompts, max_new_tokens=20, temperature=0).tokens
  # A stop token that one row generates late and another never: some rows stop, some do not.
  eos = [next(t for t in runs[2][3:] if any(t not in r for r in runs))]
  sampler = Sampler(model, eos_ids=eos, pad_id=0, max_seq_len=128, min_prompt_bucket=8)
  greedy = sampler.generate(prompts, max_new_tokens=20, temperature=0)
  assert "stop" in greedy.finish_reasons and "length" in greedy.finish_reasons
  seeds = [5, 2 ** 63 + 1, 17, 0, 99]
  for kw in [dict(temperature=0), dict(temperature=1.0, seed=seeds),
             dict(temperature=0.7, top_k=20, top_p=0.8, seed=3)]:
    whole = sampler.generate(prompts, max_new_tokens=20, **kw)
    shared = sampler.generate(prompts, max_new_tokens=20, share_prefix=True, **kw)
    assert shared.tokens == whole.tokens, kw
    assert shared.finish_reasons == whole.finish_reasons
    np.testing.assert_allclose(np.concatenate(shared.logprobs),
                               np.concatenate(whole.logprobs), atol=1e-5)
  assert sampler._jitted_shared._cache_size() == 1  # the shared path ran, one program


def test_shared_prefix_too_short_prefills_whole_prompts(ref):
  """A common prefix under `min_prompt_bucket` tokens saves nothing: the usual program runs."""
  _, _, model = ref
  sampler = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128, min_prompt_bucket=8)
  prompts = [[4, 5, 6] + p for p in PROMPTS]
  out = sampler.generate(prompts, max_new_tokens=6, temperature=0, share_prefix=True)
  assert sampler._jitted_shared._cache_size() == 0  # pylint: disable=protected-access
  assert out.tokens == sampler.generate(prompts, max_new_tokens=6, temperature=0).tokens
  assert common_prefix_length(prompts) == 3
  assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 3
  assert common_prefix_length([[1, 2, 3]]) == 3


def test_shared_prefix_on_a_mesh(ref):
  _, path, model = ref
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tp=2))
  multi = Sampler(load_hf(path, mesh=mesh), eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128,
                  min_prompt_bucket=8, mesh=mesh)
  single = Sampler(model, eos_ids=[VOCAB - 1], pad_id=0, max_seq_len=128, min_prompt_bucket=8)
  prompts = _knowledge_prompts(1)
  a = single.generate(prompts, max_new_tokens=8, temperature=0)
  b = multi.generate(prompts, max_new_tokens=8, temperature=0, share_prefix=True)
  assert multi._jitted_shared._cache_size() == 1  # pylint: disable=protected-access
  assert a.tokens == b.tokens
  np.testing.assert_allclose(np.concatenate(a.logprobs), np.concatenate(b.logprobs),
                             atol=1e-4)
