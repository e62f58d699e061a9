"""Continuous batching: a fixed number of decode slots whose rows start and end on their own.

    decoder = SlotDecoder(sampler, slots=16, max_new_tokens=1024, temperature=0.7, top_k=0,
                          top_p=1.0)
    decoder.start([row], [prompt_ids], [seed])   # prefill into a free slot
    for reply in decoder.run():                    # a chunk of decode steps for all slots
      ...reply.row is free again; start the next prompt there...

`generate` (`oel_jax.sampling`) decodes a batch until its longest row ends, so finished rows
sit idle while the others go on. Here each of ``slots`` rows has its own cache position
(`KVCache.index` per row), its own step count and its own stop: `run` decodes a chunk of
``chunk_steps`` steps for every slot in one jitted call (Python stays off the per-token
path), then hands back the rows that finished; `start` prefills new prompts into free rows
while the other rows keep their caches.

Same tokens as `generate`. A row's token number ``t`` is drawn exactly as `generate` draws
it: from the uniform of ``fold_in(key(seed), t)``, by `sample_next`, from the logits of
`Sampler._logits`; a row attends to its own tokens only. The logits can differ from a
`generate` call's in the last bits (the row sits at other cache slots, among other rows:
other reduction orders), as they already do between two `generate` batches; the tests
check that the tokens are the same.
"""

# The slot programs are the sampler's own (its weights, graph and padding), kept apart from it.
# pylint: disable=protected-access

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from oel_jax import parallel
from oel_jax.models.qwen3 import KVCache
from oel_jax.sampling import Sampler, _row_seeds, bucket_size, sample_next


@struct.dataclass
class SlotState:
  """Every slot's decoding state, on the device (N slots, S cache slots, G token columns)."""

  cache: KVCache
  """Keys and values `[N, K, S, D]` per layer; ``index`` `[N]`: each row's next slot."""
  token: jax.Array
  """`[N]` int32: each row's last token (the next step's input)."""
  step: jax.Array
  """`[N]` int32: tokens sampled so far in each row's reply (the next one's index)."""
  done: jax.Array
  """`[N]` bool: the row stopped (or holds no prompt); it is not decoded."""
  budget: jax.Array
  """`[N]` int32: most tokens each row's reply may have."""
  keys: jax.Array
  """`[N, 2]` uint32: each row's threefry key data (from its seed)."""
  tokens: jax.Array
  """`[N, G]` int32: each row's reply so far (pad after its end)."""
  logprobs: jax.Array
  """`[N, G]` float32: each token's log-probability."""


@dataclasses.dataclass(frozen=True)
class Reply:
  """A finished row, handed back by `SlotDecoder.run`; its row is free again."""

  row: int
  """The slot it ran in."""
  tokens: list[int]
  """Generated ids; the stop token included when one was hit."""
  logprobs: list[float]
  """Per token, as in `oel_jax.sampling.GenerationOutput.logprobs`."""
  finish_reason: str
  """"stop" (a stop token) or "length" (``max_new_tokens`` reached)."""


def batch_shards(sampler: Sampler) -> int:
  """Devices a batch is split over: the mesh's data x fsdp (1 without a mesh)."""
  mesh = sampler.mesh
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def state_shardings(sampler: Sampler) -> SlotState | None:
  """Where each array of a `SlotState` lives on the sampler's mesh (None without one): rows
  over (data, fsdp); the cache's KV heads also over tp, as the key and value projections
  (`k_proj`, `v_proj`: heads over tp) and so `generate`'s cache are split (the model's
  sharding refuses KV heads that tp does not divide)."""
  mesh = sampler.mesh
  if mesh is None:
    return None
  spec = lambda *axes: jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), *axes))
  layers = sampler.config.num_layers
  return SlotState(
      cache=KVCache(k=(spec("tp", None, None),) * layers, v=(spec("tp", None, None),) * layers,
                    mask=spec(None), index=spec()),
      token=spec(), step=spec(), done=spec(), budget=spec(), keys=spec(None),
      tokens=spec(None), logprobs=spec(None))


class _Programs:
  """The jitted programs of one sampler's slots: a new state, a larger cache, prefill and
  decode chunk (compiled per shape, kept for the sampler's life, so every rollout after the
  first reuses them). On a mesh every one returns the state with `state_shardings`."""

  def __init__(self, sampler: Sampler):
    self.sampler = sampler
    self.num_compilations = 0
    self.shardings = state_shardings(sampler)
    out = {} if self.shardings is None else {"out_shardings": self.shardings}
    # The state is donated: the caches are updated in place, not copied every call.
    self.prefill = jax.jit(self._prefill, donate_argnums=(1,), **out)
    self.decode = jax.jit(self._decode, donate_argnums=(1,), **out)
    self.zeros = jax.jit(self._zeros, static_argnums=(0, 1, 2), **out)
    # Not donated: the cache changes shape, so its buffers could not be reused.
    self.grow = jax.jit(self._grow, static_argnums=(1,), **out)

  def _constrain(self, state: SlotState) -> SlotState:
    """The state pinned to its shardings on a mesh: the decode loop's carry, so that the
    partitioner keeps the cache's layout through the loop rather than picking its own (the
    programs' ``out_shardings`` pin only what they return; XLA:CPU's propagation keeps the
    layout without this too, in the tests)."""
    if self.shardings is None:
      return state
    return jax.lax.with_sharding_constraint(state, self.shardings)

  def _zeros(self, rows: int, slots: int, gen: int) -> SlotState:
    """An empty state: ``rows`` rows, all done, ``slots`` cache slots, ``gen`` token columns."""
    cache = KVCache.zeros(self.sampler.config, rows, slots)
    return SlotState(
        cache=cache.replace(index=jnp.zeros((rows,), jnp.int32)),
        token=jnp.zeros((rows,), jnp.int32), step=jnp.zeros((rows,), jnp.int32),
        done=jnp.ones((rows,), bool), budget=jnp.zeros((rows,), jnp.int32),
        keys=jnp.zeros((rows, 2), jnp.uint32),
        tokens=jnp.full((rows, gen), self.sampler.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, gen), jnp.float32))

  def _grow(self, state: SlotState, slots: int) -> SlotState:
    """The state with ``slots`` cache slots: each row's slots kept, new empty ones after."""
    grow = slots - state.cache.slots
    pad = lambda a: jnp.pad(a, [(0, 0)] * 2 + [(0, grow), (0, 0)])
    cache = state.cache
    return state.replace(cache=cache.replace(
        k=tuple(pad(k) for k in cache.k), v=tuple(pad(v) for v in cache.v),
        mask=jnp.pad(cache.mask, ((0, 0), (0, grow)))))

  def _sample(self, model, hidden, keys, step, temperature, top_k, top_p):
    """Each row's token number ``step`` `[N]` from hidden states `[N, H]`, as `generate`
    draws it: `(tokens [N], logprobs [N])`."""
    keys = jax.random.wrap_key_data(keys)
    u = jax.vmap(lambda k, s: jax.random.uniform(jax.random.fold_in(k, s)))(keys, step)
    logits = self.sampler._logits(model, hidden, keys, step)
    return sample_next(u, logits, temperature, top_k, top_p)

  def _prefill(self, params, state: SlotState, rows, ids, mask, keys, budget, temperature,
               top_k, top_p) -> SlotState:
    """Prefills prompts `[n, P]` (left-padded) into slots ``rows`` `[n]` (``N`` for a filler
    row: dropped), each with its token ``budget`` `[n]`, and samples each one's first token;
    the other slots are untouched."""
    self.num_compilations += 1  # runs only while tracing
    sampler = self.sampler
    model = nnx.merge(sampler._graphdef, params)
    n, prompt_len = ids.shape
    fresh = KVCache.zeros(sampler.config, n, prompt_len)
    fresh = fresh.replace(index=jnp.zeros((n,), jnp.int32))
    hidden, fresh = model.hidden_states(ids, attention_mask=mask, cache=fresh)
    zero = jnp.zeros((n,), jnp.int32)
    tok, lp = self._sample(model, hidden[:, -1], keys, zero, temperature, top_k, top_p)
    eos = jnp.asarray(sampler.eos_ids, jnp.int32)
    gen = state.tokens.shape[1]
    # The per-row arrays: each state row picks its new prompt's values, if it has one. (XLA
    # partitions a scatter of these into rows split over a mesh by gathering the whole array
    # first; this stays local. The caches' scatter it partitions without: each device writes
    # its own rows, from the new rows gathered.)
    takes = rows[None, :] == jnp.arange(state.done.shape[0])[:, None]  # [N, n]
    source = jnp.argmax(takes, axis=1)  # [N]: the prompt a started row takes
    started = takes.any(axis=1)  # [N]

    def put(old, new):
      return jnp.where(started.reshape(-1, *(1,) * (old.ndim - 1)), new[source], old)

    cache = state.cache
    pad_slots = ((0, 0), (0, cache.slots - prompt_len))  # a started row's mask: prompt, empty
    cache = KVCache(
        k=tuple(c.at[rows, :, :prompt_len].set(f, mode="drop") for c, f in zip(cache.k, fresh.k)),
        v=tuple(c.at[rows, :, :prompt_len].set(f, mode="drop") for c, f in zip(cache.v, fresh.v)),
        mask=jnp.where(started[:, None], jnp.pad(fresh.mask[source], pad_slots), cache.mask),
        index=put(cache.index, fresh.index))
    return SlotState(
        cache=cache, token=put(state.token, tok), step=put(state.step, zero + 1),
        done=put(state.done, jnp.isin(tok, eos) | (budget <= 1)),
        budget=put(state.budget, budget), keys=put(state.keys, keys),
        tokens=put(state.tokens, jnp.full((n, gen), sampler.pad_id, jnp.int32).at[:, 0].set(tok)),
        logprobs=put(state.logprobs, jnp.zeros((n, gen), jnp.float32).at[:, 0].set(lp)))

  def _decode(self, params, state: SlotState, steps, temperature, top_k, top_p) -> SlotState:
    """Up to ``steps`` decode steps for every running row (fewer when all have stopped)."""
    self.num_compilations += 1  # runs only while tracing
    sampler = self.sampler
    model = nnx.merge(sampler._graphdef, params)
    eos = jnp.asarray(sampler.eos_ids, jnp.int32)
    columns = jnp.arange(state.tokens.shape[1])

    def cond(carry):
      i, st = carry
      return (i < steps) & ~jnp.all(st.done)

    def body(carry):
      i, st = carry
      live = ~st.done
      hidden, cache = model.hidden_states(st.token[:, None], attention_mask=live[:, None],
                                          cache=st.cache)
      # A stopped row's position stays put (it writes only masked slots meanwhile).
      cache = cache.replace(index=jnp.where(live, cache.index, st.cache.index))
      tok, lp = self._sample(model, hidden[:, 0], st.keys, st.step, temperature, top_k, top_p)
      here = (columns == st.step[:, None]) & live[:, None]  # [N, G]: this step's column
      step = st.step + live
      return i + 1, self._constrain(st.replace(
          cache=cache, token=jnp.where(live, tok, st.token), step=step,
          done=st.done | (jnp.isin(tok, eos) | (step >= st.budget)),
          tokens=jnp.where(here, tok[:, None], st.tokens),
          logprobs=jnp.where(here, lp[:, None], st.logprobs)))

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state


_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def programs(sampler: Sampler) -> _Programs:
  """The sampler's slot programs (made once per sampler)."""
  if sampler not in _PROGRAMS:
    _PROGRAMS[sampler] = _Programs(sampler)
  return _PROGRAMS[sampler]


class SlotDecoder:
  """``slots`` rows decoding at once, each started and handed back on its own.

  Args:
    sampler: the `Sampler` whose model and weights decode (`supports_slots`), on one device
      or on its mesh (`state_shardings`).
    slots: rows decoded at once (on a mesh the state holds `rows`, this rounded up to a
      multiple of data x fsdp; the extra rows stay empty).
    max_new_tokens: token budget of each reply.
    temperature, top_k, top_p: the sampling settings (as in `Sampler.generate`).
    chunk_steps: decode steps per `run` call (a finished row waits at most this many
      steps for its hand-back; a call costs a few milliseconds of Python and transfers).
  """

  def __init__(self, sampler: Sampler, slots: int, *, max_new_tokens: int,
               temperature: float, top_k: int, top_p: float, chunk_steps: int = 16):
    if not getattr(sampler, "supports_slots", False):
      raise ValueError(f"SlotDecoder: this sampler ({type(sampler).__name__}) does not "
                       "support slots (supports_slots is not True): use generate")
    for name, value in (("slots", slots), ("max_new_tokens", max_new_tokens),
                        ("chunk_steps", chunk_steps)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"SlotDecoder: {name} must be an integer >= 1, got {value!r}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(f"SlotDecoder: invalid sampling settings: temperature={temperature} "
                       f"(>= 0), top_k={top_k} (>= 0), top_p={top_p} (in (0, 1])")
    self.sampler = sampler
    self.slots = int(slots)
    shards = batch_shards(sampler)
    self.rows = -(-self.slots // shards) * shards
    """Rows of the state: ``slots`` rounded up to a multiple of the mesh's batch shards."""
    self.max_new_tokens = int(max_new_tokens)
    self.chunk_steps = int(chunk_steps)
    self._knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    self._programs = programs(sampler)
    self._gen = bucket_size(self.max_new_tokens, 16)  # token columns, as `generate` pads them
    self._prompt_slots = 0  # cache slots for prompts (grows with the longest prompt)
    self._state: SlotState | None = None
    self._busy = [False] * self.slots

  @property
  def free_rows(self) -> list[int]:
    """Rows holding no prompt, in order."""
    return [r for r, busy in enumerate(self._busy) if not busy]

  @property
  def busy(self) -> int:
    """How many rows hold a prompt (running or finished but not yet handed back)."""
    return sum(self._busy)

  def start(self, rows: Sequence[int], prompts: Sequence[Sequence[int]],
            seeds: Sequence[int], budgets: Sequence[int] | None = None) -> None:
    """Prefills ``prompts`` (token ids) into the free ``rows``, one seed per prompt (in
    [0, 2^64), as `Sampler.generate` takes them), and samples their first tokens.

    ``budgets``: the most tokens each prompt's reply may have, in [1, max_new_tokens] (default:
    max_new_tokens for every one), as `Sampler.generate`'s ``max_new_tokens`` for that prompt
    alone (a server's per-request limit)."""
    if not prompts:
      return
    rows = [int(r) for r in rows]
    if len(rows) != len(prompts):
      raise ValueError(f"start: {len(rows)} rows for {len(prompts)} prompts")
    for r in rows:
      if not 0 <= r < self.slots or self._busy[r]:
        raise ValueError(f"start: row {r} is not a free row of {self.slots} slots")
    if len(set(rows)) != len(rows):
      raise ValueError(f"start: rows repeat: {rows}")
    row_seeds = _row_seeds(list(seeds), len(prompts))
    budgets = [self.max_new_tokens] * len(prompts) if budgets is None else list(budgets)
    if len(budgets) != len(prompts):
      raise ValueError(f"start: {len(budgets)} budgets for {len(prompts)} prompts")
    sampler = self.sampler
    for i, (p, budget) in enumerate(zip(prompts, budgets)):
      if (isinstance(budget, bool) or not isinstance(budget, (int, np.integer))
          or not 1 <= budget <= self.max_new_tokens):
        raise ValueError(f"start: budget {i} must be an integer in [1, max_new_tokens="
                         f"{self.max_new_tokens}], got {budget!r}")
      if not p:
        raise ValueError(f"start: prompt {i} is empty")
      if len(p) + budget > sampler.max_seq_len:
        raise ValueError(f"start: prompt {i} has {len(p)} tokens; with max_new_tokens="
                         f"{budget} it exceeds max_seq_len={sampler.max_seq_len}")
    prompt_len = bucket_size(max(len(p) for p in prompts), sampler.min_prompt_bucket,
                             sampler.buckets_per_doubling)
    self._ensure_cache(prompt_len)
    n = bucket_size(len(prompts), 1, sampler.buckets_per_doubling, batch_shards(sampler))
    ids, mask, _, keys = sampler._pad_batch(prompts, row_seeds, prompt_len, n)
    slot_rows = np.full((n,), self.rows, np.int32)  # fillers point past the end: dropped
    slot_rows[:len(rows)] = rows
    row_budgets = np.ones((n,), np.int32)
    row_budgets[:len(rows)] = budgets
    # Every device is told every destination row; the prompts are split as generate's are.
    slot_rows, = self._place([slot_rows], split=False)
    ids, mask, keys, row_budgets = self._place([ids, mask, keys, row_budgets], split=True)
    self._state = self._programs.prefill(
        sampler._params, self._state, slot_rows, ids, mask, keys, row_budgets, *self._knobs)
    for r in rows:
      self._busy[r] = True

  def run(self, steps: int | None = None) -> list[Reply]:
    """Decodes up to ``steps`` (default ``chunk_steps``) steps for every running row, then
    hands back every row that has finished (their rows are free again), in row order."""
    if self._state is None or not self.busy:
      return []
    state = self._programs.decode(self.sampler._params, self._state,
                                  jnp.int32(steps or self.chunk_steps), *self._knobs)
    self._state = state
    done, count = parallel.to_host(state.done), parallel.to_host(state.step)
    finished = [r for r in range(self.slots) if self._busy[r] and done[r]]
    if not finished:
      return []
    # Whole arrays to the host (a few hundred KB), indexed there: a device gather would be one
    # more small program per count of finished rows.
    tokens = parallel.to_host(state.tokens)[finished]
    logprobs = parallel.to_host(state.logprobs)[finished]
    eos = set(self.sampler.eos_ids)
    replies = []
    for i, r in enumerate(finished):
      toks = tokens[i, :count[r]].tolist()
      reason = "stop" if toks and toks[-1] in eos else "length"
      replies.append(Reply(r, toks, logprobs[i, :count[r]].tolist(), reason))
      self._busy[r] = False
    return replies

  def _place(self, arrays: Sequence[np.ndarray], *, split: bool) -> list[jax.Array]:
    """Host inputs on the device(s): on a mesh ``split`` over its batch axes (as the
    sampler places `generate`'s batch), or whole on every device."""
    mesh = self.sampler.mesh
    if split or mesh is None:
      return self.sampler._place(arrays)
    replicated = jax.sharding.NamedSharding(mesh, P())
    return [parallel.place(a, replicated) for a in arrays]

  def _ensure_cache(self, prompt_len: int) -> None:
    """Makes room for prompts of ``prompt_len`` slots: the state on first use, a larger
    cache (running rows kept, their slots unchanged) when a longer prompt comes."""
    if prompt_len <= self._prompt_slots:
      return
    slots = prompt_len + self._gen
    if self._state is None:
      self._state = self._programs.zeros(self.rows, slots, self._gen)
    else:
      self._state = self._programs.grow(self._state, slots)
    self._prompt_slots = prompt_len
