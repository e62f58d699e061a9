"""Continuous batching (oel_jax.slots, oel_jax.envs.continuous) against the lockstep path.

The reference is today's code: `Sampler.generate` for the slot decoder, and the lockstep
`rollout` for rollouts with `RolloutConfig.slots`: the same tokens, finish reasons and
trajectories (files byte for byte), greedy and sampled, with reply lengths that vary from one
token to the budget (`LognormalLengthSampler`) and, in the rollouts, later turns' prompts that
outgrow the first cache. On a mesh (simulated CPU devices, tests/conftest.py) the slot decoder
gives the one-device decoder's and `generate`'s tokens, its state stays split as
`oel_jax.slots.state_shardings` says, and continuous rollouts give lockstep's trajectories.
"""

import dataclasses

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
import pytest

from oel_jax import chat, parallel, tiny
from oel_jax.envs import ModelInfo, RolloutConfig, game_seeds, rollout
from oel_jax.envs import lockstep
from oel_jax.reply_lengths import LognormalLengthSampler, lognormal_length
from oel_jax.sampling import Sampler
from oel_jax.slots import SlotDecoder, programs
from scripted_sampler import ScriptedSampler, bfs_policy

MODEL = ModelInfo("tiny", round=0)
NEW = 16  # as `max_new_tokens=1`, 16 token columns: the same programs


@pytest.fixture(scope="module", name="tok")
def fixture_tok():
  return tiny.load_tiny_tokenizer()


@pytest.fixture(scope="module", name="sampler")
def fixture_sampler(tok):
  """A two-layer tiny model whose reply lengths are lognormal; few, quick compiles (every
  prompt here pads to 256 or 512 tokens, every reply to 16)."""
  return LognormalLengthSampler(tiny.tiny_model(num_layers=2), median=6, sigma=1.0,
                                eos_ids=chat.stop_token_ids(tok), pad_id=tiny.PAD_ID,
                                max_seq_len=512, min_prompt_bucket=256)


def _prompts(n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
  """``n`` prompts from 3 to 70 tokens, longest last, and a seed for each."""
  rng = np.random.default_rng(seed)
  lengths = sorted(rng.integers(3, 71, n).tolist())
  lengths[-1] = 70
  return ([rng.integers(0, 2000, k).tolist() for k in lengths],
          rng.integers(0, 2 ** 63, n, dtype=np.uint64).tolist())


def _through_slots(decoder: SlotDecoder, prompts, seeds, check=lambda decoder: None) -> list:
  """Every prompt's `Reply`, each started in the first free row after the previous ones;
  ``check(decoder)`` after every start and run."""
  queue, owner, out = list(range(len(prompts))), {}, [None] * len(prompts)
  while queue or decoder.busy:
    rows = decoder.free_rows[:len(queue)]
    started, queue = queue[:len(rows)], queue[len(rows):]
    owner.update(zip(rows, started))
    decoder.start(rows, [prompts[i] for i in started], [seeds[i] for i in started])
    check(decoder)
    for reply in decoder.run():
      out[owner.pop(reply.row)] = reply
    check(decoder)
  return out


@pytest.mark.parametrize("sampling", [dict(temperature=0.0, top_k=0, top_p=1.0),
                                      dict(temperature=1.0, top_k=0, top_p=1.0),
                                      dict(temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["greedy", "temperature", "top_k_top_p"])
def test_slot_decoder_gives_generates_tokens(sampler, sampling):
  prompts, seeds = _prompts(9)
  expected = sampler.generate(prompts, max_new_tokens=NEW, seed=seeds, **sampling)
  decoder = SlotDecoder(sampler, 3, max_new_tokens=NEW, chunk_steps=5, **sampling)
  replies = _through_slots(decoder, prompts, seeds)
  assert [r.tokens for r in replies] == expected.tokens
  assert [r.finish_reason for r in replies] == expected.finish_reasons
  np.testing.assert_allclose(np.concatenate([r.logprobs for r in replies]),
                             np.concatenate(expected.logprobs), atol=1e-5)
  assert decoder.busy == 0 and decoder.free_rows == [0, 1, 2]
  # Lengths from a token to past the budget, as the sampler set them from the seeds.
  words = np.asarray(seeds, np.uint64)
  keys = np.stack([words >> np.uint64(32), words & np.uint64(0xFFFFFFFF)], -1)
  lengths = np.asarray(lognormal_length(jax.random.wrap_key_data(keys.astype(np.uint32)), 6, 1))
  assert [len(r.tokens) for r in replies] == np.minimum(lengths, NEW).tolist()
  assert {"stop", "length"} == set(expected.finish_reasons)


def test_slot_decoder_per_row_budgets_give_generates_tokens_alone(sampler):
  """Each row's own budget (a server's max_tokens per request): its reply is `generate`'s
  with that budget, on its prompt alone."""
  prompts, seeds = _prompts(5, seed=2)
  budgets = [1, 3, 16, 7, 2]
  decoder = SlotDecoder(sampler, 2, max_new_tokens=NEW, temperature=0.7, top_k=0, top_p=0.9,
                        chunk_steps=3)
  queue, owner, out = list(range(5)), {}, [None] * 5
  while queue or decoder.busy:
    rows = decoder.free_rows[:len(queue)]
    started, queue = queue[:len(rows)], queue[len(rows):]
    owner.update(zip(rows, started))
    decoder.start(rows, [prompts[i] for i in started], [seeds[i] for i in started],
                  [budgets[i] for i in started])
    for reply in decoder.run():
      out[owner.pop(reply.row)] = reply
  for i, reply in enumerate(out):
    alone = sampler.generate([prompts[i]], max_new_tokens=budgets[i], temperature=0.7,
                             top_p=0.9, seed=[seeds[i]])
    assert (reply.tokens, reply.finish_reason) == (alone.tokens[0], alone.finish_reasons[0])
    assert len(reply.tokens) <= budgets[i]
  assert "length" in [r.finish_reason for r in out]
  with pytest.raises(ValueError, match=r"budget 0 must be an integer in \[1, max_new_tokens=16\]"):
    decoder.start([0], [[1, 2]], [0], [17])
  with pytest.raises(ValueError, match="2 budgets for 1 prompts"):
    decoder.start([0], [[1, 2]], [0], [1, 2])


def test_slot_decoder_one_token_budget(sampler):
  """Rows that end at their first token (prefill alone), started in rows out of order."""
  prompts, seeds = _prompts(2, seed=1)
  expected = sampler.generate(prompts, max_new_tokens=1, temperature=0.0, seed=seeds)
  decoder = SlotDecoder(sampler, 4, max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0)
  decoder.start([3, 1], prompts, seeds)
  replies = decoder.run()
  assert [r.row for r in replies] == [1, 3]
  assert [r.tokens for r in replies] == expected.tokens[::-1]
  assert [r.finish_reason for r in replies] == expected.finish_reasons[::-1]
  assert decoder.run() == [] and decoder.free_rows == [0, 1, 2, 3]


def test_slot_decoder_refuses_bad_requests(sampler, tok):
  decoder = SlotDecoder(sampler, 2, max_new_tokens=NEW, temperature=0.0, top_k=0, top_p=1.0)
  with pytest.raises(ValueError, match="row 2 is not a free row of 2 slots"):
    decoder.start([2], [[1, 2]], [0])
  with pytest.raises(ValueError, match="prompt 0 has 500 tokens; with max_new_tokens=16 it "
                     "exceeds max_seq_len=512"):
    decoder.start([0], [[1] * 500], [0])
  with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
    decoder.start([0], [[1, 2]], [0, 1])
  decoder.start([0], [[1, 2]], [0])
  with pytest.raises(ValueError, match="row 0 is not a free row"):
    decoder.start([0], [[1, 2]], [0])
  with pytest.raises(ValueError, match="slots must be an integer >= 1"):
    SlotDecoder(sampler, 0, max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0)
  with pytest.raises(ValueError, match="does not support slots"):
    SlotDecoder(ScriptedSampler(tok, lambda user, seed: "[up]"), 2, max_new_tokens=4,
                temperature=0.0, top_k=0, top_p=1.0)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.7)],
                         ids=["greedy", "sampled"])
def test_rollout_with_slots_equals_lockstep(tok, sampler, sampling, tmp_path):
  seeds = game_seeds("train", 0, 2, 6)
  config = RolloutConfig(seed=5, progress=False, max_new_tokens=NEW, **sampling)
  lock_timings, slot_timings = {}, {}
  expected = rollout(sampler, tok, seeds, config, model=MODEL, path=str(tmp_path / "a.jsonl"),
                     timings=lock_timings)
  got = rollout(sampler, tok, seeds, dataclasses.replace(config, slots=4), model=MODEL,
                path=str(tmp_path / "b.jsonl"), timings=slot_timings)
  assert got == expected
  assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
  # The games were varied: replies of many lengths, stopped and cut, games of several turns.
  metas = [turn.metadata for t in expected for turn in t.turns]
  assert {m["finish_reason"] for m in metas} == {"stop", "length"}
  assert len({m["response_tokens"] for m in metas}) > 5
  assert slot_timings["turns"] == lock_timings["turns"] == max(len(t.turns) for t in expected)
  assert slot_timings["wall_s"] >= slot_timings["generate_s"] > 0
  assert rollout(sampler, tok, [], dataclasses.replace(config, slots=4), model=MODEL) == []


def test_samplers_without_slots_and_shared_prefixes_play_in_lockstep(tok, sampler):
  seeds = game_seeds("train", 0, 0, 5)
  bfs = bfs_policy("sokoban")
  plain = ScriptedSampler(tok, lambda user, seed: bfs(user, 0))
  slotted = ScriptedSampler(tok, lambda user, seed: bfs(user, 0))
  config = RolloutConfig(env="sokoban", progress=False)
  a = rollout(plain, tok, seeds, config, model=MODEL)
  b = rollout(slotted, tok, seeds, dataclasses.replace(config, slots=2), model=MODEL)
  assert a == b
  assert [c.kwargs["seed"] for c in slotted.calls] == [c.kwargs["seed"] for c in plain.calls]

  class Slotted:  # pylint: disable=too-few-public-methods
    supports_slots = True

  on = RolloutConfig(slots=2)
  assert lockstep.uses_slots(Slotted(), on)
  assert not lockstep.uses_slots(Slotted(), on, share_prefix=True)
  assert not lockstep.uses_slots(Slotted(), RolloutConfig())
  assert not lockstep.uses_slots(plain, on)
  # A sampler on a mesh supports slots too.
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tp=2))
  on_mesh = Sampler(tiny.tiny_model(num_layers=1), eos_ids=[1], pad_id=0, max_seq_len=64,
                    mesh=mesh)
  assert sampler.supports_slots and on_mesh.supports_slots
  assert lockstep.uses_slots(on_mesh, on)


def test_slots_is_checked():
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="slots"):
      RolloutConfig(slots=bad)


# ---- on a mesh ----

MESHES = {"mesh_2x2x2": dict(data=2, fsdp=2, tp=2), "tp_2": dict(data=1, fsdp=1, tp=2)}


@pytest.fixture(scope="module", name="mesh_samplers")
def fixture_mesh_samplers(tok):
  """The module sampler's model and reply lengths, split over each mesh of `MESHES` (made
  on first use, kept for the module: each compiles its slot programs once)."""
  made = {}

  def get(name):
    if name not in made:
      config = parallel.MeshConfig(**MESHES[name])
      mesh = parallel.make_mesh(config, jax.devices()[:np.prod(list(MESHES[name].values()))])
      made[name] = LognormalLengthSampler(
          parallel.shard_model(tiny.tiny_model(num_layers=2), mesh), median=6, sigma=1.0,
          eos_ids=chat.stop_token_ids(tok), pad_id=tiny.PAD_ID, max_seq_len=512,
          min_prompt_bucket=256, mesh=mesh)
    return made[name]
  return get


def _assert_state_split(decoder: SlotDecoder):
  """Every array of the decoder's state is split as `state_shardings` lays it out: rows over
  (data, fsdp), the cache's KV heads over tp."""
  state = decoder._state  # pylint: disable=protected-access
  rows, heads = P(("data", "fsdp")), P(("data", "fsdp"), "tp", None, None)
  for k, v in zip(state.cache.k, state.cache.v):
    assert k.sharding.spec == v.sharding.spec == heads
    assert k.sharding.mesh == decoder.sampler.mesh
  for a in (state.cache.index, state.token, state.step, state.done, state.budget):
    assert a.sharding.spec == rows
  for a in (state.cache.mask, state.keys, state.tokens, state.logprobs):
    assert a.sharding.spec == P(("data", "fsdp"), None)
  assert state.token.shape == (decoder.rows,)
  # Each device holds its rows and its heads only.
  shards = decoder.sampler.mesh.shape["data"] * decoder.sampler.mesh.shape["fsdp"]
  tp = decoder.sampler.mesh.shape["tp"]
  k = state.cache.k[0]
  assert {s.data.shape for s in k.addressable_shards} == {
      (decoder.rows // shards, k.shape[1] // tp, *k.shape[2:])}


def _assert_no_state_gathers(decoder: SlotDecoder, prompt_len: int):
  """The compiled prefill and decode take and return the state as it lies (no resharding in
  or out), and no collective in them moves any of the state's cache: none has its slot count
  (the prefill gathers only its new rows' cache, of the prompts' length)."""
  # pylint: disable=protected-access
  progs, state, sampler = programs(decoder.sampler), decoder._state, decoder.sampler
  shardings = jax.tree.map(lambda a: a.sharding, state)
  n = decoder.rows
  rows, = decoder._place([np.arange(n, dtype=np.int32)], split=False)
  ids, mask, keys, budget = decoder._place(
      [np.zeros((n, prompt_len), np.int32), np.ones((n, prompt_len), np.int32),
       np.zeros((n, 2), np.uint32), np.ones((n,), np.int32)], split=True)
  compiled = {
      "prefill": progs.prefill.lower(sampler._params, state, rows, ids, mask, keys, budget,
                                     *decoder._knobs).compile(),
      "decode": progs.decode.lower(sampler._params, state, np.int32(1),
                                   *decoder._knobs).compile()}
  slots = state.cache.slots
  assert slots not in (prompt_len, sampler.config.hidden_size, sampler.config.vocab_size)
  for name, program in compiled.items():
    assert program.input_shardings[0][1] == shardings, name
    assert program.output_shardings == shardings, name
    computations = parallel.parse_hlo(program.as_text())
    collectives = parallel.collectives(computations, "ENTRY")
    assert collectives, name  # the model's own, on a mesh
    moved = [inst for inst in collectives if any(slots in a.shape for a in inst.results)]
    assert not moved, (name, moved)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_slot_decoder_on_a_mesh_gives_one_devices_tokens(sampler, mesh_samplers, mesh_name):
  """Three slots (four rows on the 2x2x2 mesh: data x fsdp = 4), refills, prompts of 3 to 70
  tokens, sampled with per-row seeds: the tokens of the one-device decoder and of `generate`,
  and the state split as designed after every prefill and decode chunk. On the 2x2x2 mesh
  also greedy, and a 300-token prompt last (the cache grows from 256 + 16 to 512 + 16
  slots)."""
  full = mesh_name == "mesh_2x2x2"
  multi = mesh_samplers(mesh_name)
  prompts, seeds = _prompts(9)  # the first test's: its one-device programs serve again
  if full:
    prompts.append(list(range(300)))
    seeds.append(12345)
  settings = [dict(temperature=0.7, top_k=20, top_p=0.9)]
  if full:
    settings.insert(0, dict(temperature=0.0, top_k=0, top_p=1.0))
  for sampling in settings:
    expected = sampler.generate(prompts, max_new_tokens=NEW, seed=seeds, **sampling)
    single = _through_slots(SlotDecoder(sampler, 3, max_new_tokens=NEW, chunk_steps=5,
                                        **sampling), prompts, seeds)
    decoder = SlotDecoder(multi, 3, max_new_tokens=NEW, chunk_steps=5, **sampling)
    assert decoder.rows == (4 if full else 3)
    got = _through_slots(decoder, prompts, seeds, check=_assert_state_split)
    assert [r.tokens for r in got] == [r.tokens for r in single] == expected.tokens
    assert [r.finish_reason for r in got] == expected.finish_reasons
    np.testing.assert_allclose(np.concatenate([r.logprobs for r in got]),
                               np.concatenate([r.logprobs for r in single]), atol=1e-4)
    assert decoder.free_rows == [0, 1, 2]
    assert {"stop", "length"} == set(expected.finish_reasons)
  # A decode program per cache size, none recompiled for a state that came back otherwise
  # split.
  # pylint: disable-next=protected-access
  assert programs(multi).decode._cache_size() == (2 if full else 1)
  _assert_no_state_gathers(decoder, 512 if full else 256)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.7)],
                         ids=["greedy", "sampled"])
def test_rollout_with_slots_on_a_mesh_equals_lockstep(tok, sampler, mesh_samplers, sampling,
                                                      tmp_path):
  """Continuous batching on the 2x2x2 mesh against lockstep on one device: the same
  trajectories, files byte for byte."""
  seeds = game_seeds("train", 0, 2, 6)
  config = RolloutConfig(seed=5, progress=False, max_new_tokens=NEW, **sampling)
  expected = rollout(sampler, tok, seeds, config, model=MODEL, path=str(tmp_path / "a.jsonl"))
  multi = mesh_samplers("mesh_2x2x2")
  assert lockstep.uses_slots(multi, dataclasses.replace(config, slots=3))
  got = rollout(multi, tok, seeds, dataclasses.replace(config, slots=3), model=MODEL,
                path=str(tmp_path / "b.jsonl"))
  assert got == expected
  assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
  assert len({turn.metadata["response_tokens"] for t in expected for turn in t.turns}) > 5
