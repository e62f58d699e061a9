"""Batched generation with a KV cache: one prefill, then a decode loop in one jitted program.

`Sampler(model, eos_ids=..., pad_id=..., max_seq_len=...)` compiles one program per
(batch bucket, prompt-length bucket, new-token bucket); the sampling settings, the token
budget and the weights are traced inputs, so changing any of them, or prompt lengths
within a bucket, reuses the program. Prompts are left-padded so that every row's next
token lands in the same cache slot. `generate(..., share_prefix=True)` prefills a prefix
common to all prompts (a knowledge text) once and copies its cache to every row, in a second
program per (batch, prefix-length, suffix-length, new-token) bucket.

Each step's token is chosen by `oel_jax.token_choice.sample_next` (temperature, then top-k,
then top-p; the log-probability reported for a token is under the distribution it was drawn
from, after all three; for greedy decoding, the model's own log-softmax at temperature 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oel_jax import chat, parallel
from oel_jax.models.qwen3 import KVCache, Qwen3
# draw and the caps are re-exported: the sampler's token choice was defined here before.
from oel_jax.token_choice import SMALL_TOP_K_CAP, TOP_K_CAP, draw, sample_next  # noqa: F401


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
  """What `Sampler.generate` returns, one entry per prompt, in prompt order."""

  tokens: list[list[int]]
  """Generated ids per prompt; the stop token is included when one was hit."""
  logprobs: list[list[float]]
  """Per generated token, its log-probability under the distribution it was sampled from."""
  finish_reasons: list[str]
  """"stop" (a stop token was generated) or "length" (the budget ran out)."""


def bucket_size(n: int, minimum: int = 1, per_doubling: int = 1, multiple: int = 1) -> int:
  """The padded size for ``n``: the smallest bucket >= max(n, minimum), a multiple of ``multiple``.

  Buckets are the powers of two and ``per_doubling - 1`` evenly spaced sizes between each two
  (``per_doubling=2``: 64, 96, 128, 192, 256, 384, ...), so padding wastes at most a factor
  ``1 + 1 / per_doubling`` and n up to N has about ``per_doubling * log2(N)`` buckets.
  """
  n = max(int(n), int(minimum), 1)
  base = 1 << (n.bit_length() - 1)  # largest power of two <= n
  step = max(1, base // int(per_doubling))
  size = base + -(-(n - base) // step) * step
  return -(-size // int(multiple)) * int(multiple)


def _last_logits(model: Qwen3, hidden: jax.Array) -> jax.Array:
  """float32 logits `[B, V]` from hidden states `[B, H]`.

  Written as unembedding @ hidden^T: with the `[V, H]` matrix as the left operand, XLA:CPU
  keeps its stored layout inside the decode loop. The other way round it hoists a
  transposed copy of the whole matrix out of the loop (311 MB at Qwen3-0.6B's vocab) and
  the in-loop matmul then runs ~30% slower.
  """
  dt = model.config.compute_dtype
  return jnp.einsum("vh,bh->vb", model.unembedding().astype(dt), hidden.astype(dt),
                    preferred_element_type=jnp.float32).T


def _row_seeds(seed: int | Sequence[int], rows: int) -> np.ndarray:
  """One uint64 seed per row: given per prompt, or derived from one seed and the row."""
  if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
    if not 0 <= seed < 2 ** 64:
      raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    # Unrelated 64-bit seeds, one per row, mixed from the one seed.
    return np.random.SeedSequence(int(seed)).generate_state(rows, np.uint64)
  seeds = list(seed)
  if len(seeds) != rows:
    raise ValueError(f"got {len(seeds)} seeds for {rows} prompts; pass one per prompt or "
                     "a single integer")
  for i, s in enumerate(seeds):
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2 ** 64:
      raise ValueError(f"seed {i} must be an integer in [0, 2^64), got {s!r}")
  return np.asarray([int(s) for s in seeds], np.uint64)


@dataclasses.dataclass(frozen=True)
class ChatCompletion:
  """One chat reply, decoded and split at `</think>`."""

  text: str
  """The decoded reply (special tokens such as the stop token removed)."""
  reasoning: str
  """Text before `</think>` (empty for non-thinking replies)."""
  answer: str
  """Text after `</think>` (the whole reply when there is none)."""
  tokens: list[int]
  """Generated ids, the stop token included when hit."""
  logprobs: list[float]
  """Per generated token, as in `GenerationOutput.logprobs`."""
  finish_reason: str
  """"stop" or "length"."""


class Sampler:
  """Generates continuations of token-id prompts with a KV cache.

  Args:
    model: a `Qwen3` (its weights are copied out; `update_weights` swaps them).
    eos_ids: ids that end a row (Qwen3: `<|im_end|>` and `<|endoftext|>`).
    pad_id: id written after a row has stopped and used to pad prompts.
    max_seq_len: longest prompt + generation the sampler accepts.
    min_prompt_bucket: smallest padded prompt length (prompts pad to powers of two).
    min_batch_bucket: smallest padded batch. XLA:CPU multiplies one bf16 row by a
      matrix (GEMV) ~10x slower than four rows, so a batch of 1 runs as 4.
    buckets_per_doubling: padded prompt lengths and batch sizes per power of two (1: powers
      of two, at most 2x padding; 2: also 1.5x powers, at most 1.5x padding and up to twice
      the programs; see `bucket_size`).
    mesh: shard the batch over the mesh's (data, fsdp) axes when it divides them.
  """

  shares_prefixes = True
  """`generate` takes ``share_prefix`` (see `oel_jax.engine.TokenSampler`)."""

  @property
  def supports_slots(self) -> bool:
    """Whether `oel_jax.slots.SlotDecoder` (continuous batching) can drive this sampler: on
    one device and on a mesh (`oel_jax.slots.state_shardings` lays its state out there)."""
    return True

  def __init__(self, model: Qwen3, *, eos_ids: Sequence[int], pad_id: int, max_seq_len: int,
               min_prompt_bucket: int = 32, min_batch_bucket: int = 4,
               buckets_per_doubling: int = 1, mesh: jax.sharding.Mesh | None = None):
    if not eos_ids:
      raise ValueError("eos_ids must name at least one stop token")
    self.config = model.config
    for i in (*eos_ids, pad_id):
      if not 0 <= int(i) < self.config.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {self.config.vocab_size})")
    self.eos_ids = tuple(int(i) for i in eos_ids)
    self.pad_id = int(pad_id)
    self.max_seq_len = int(max_seq_len)
    self.min_prompt_bucket = int(min_prompt_bucket)
    self.min_batch_bucket = int(min_batch_bucket)
    if int(buckets_per_doubling) < 1:
      raise ValueError(f"buckets_per_doubling must be >= 1, got {buckets_per_doubling}")
    self.buckets_per_doubling = int(buckets_per_doubling)
    self.mesh = mesh
    self._graphdef, params = nnx.split(model)
    # Committed to their current placement, as `update_weights` places new ones: an
    # uncommitted and a committed argument are different cache keys to jit, so leaving
    # these uncommitted made the first weight swap recompile every program once.
    # Abstract weights (`jax.ShapeDtypeStruct`s) build a sampler for `lower` alone.
    self._params = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, x.sharding),
        params)
    self.num_compilations = 0
    self._jitted = jax.jit(self._generate, static_argnames=("gen_slots",))
    self._jitted_shared = jax.jit(self._generate_shared, static_argnames=("gen_slots",))

  # ---- weights ----

  def update_weights(self, model_or_state: Qwen3 | nnx.State) -> None:
    """Swaps in new weights of the same shapes and dtypes (no recompilation)."""
    state = model_or_state
    if isinstance(state, nnx.Module):
      state = nnx.state(state)
    old = dict(nnx.to_flat_state(self._params))
    new = dict(nnx.to_flat_state(state))
    if old.keys() != new.keys():
      diff = sorted(set(old) ^ set(new), key=str)
      raise ValueError(f"update_weights: parameter set differs at {diff[0]}")
    for path, var in old.items():
      value = new[path].get_value() if hasattr(new[path], "get_value") else new[path]
      if value.shape != var.shape or value.dtype != var.get_value().dtype:
        raise ValueError(
            f"update_weights: {'.'.join(map(str, path))} is {value.shape} {value.dtype}, "
            f"expected {var.shape} {var.get_value().dtype}")
    self._params = jax.tree.map(
        lambda o, n: jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n,
        self._params, state)

  # ---- the jitted program ----

  def _generate(self, params, prompt_ids, prompt_mask, active, budget, temperature, top_k,
                top_p, row_seeds, *, gen_slots: int):
    """Prefills the whole prompts `[B, P]`, then decodes."""
    self.num_compilations += 1  # runs only while tracing
    model = nnx.merge(self._graphdef, params)
    batch, prompt_len = prompt_ids.shape
    cache = KVCache.zeros(self.config, batch, prompt_len + gen_slots)
    hidden, cache = model.hidden_states(prompt_ids, attention_mask=prompt_mask, cache=cache)
    return self._decode(model, hidden[:, -1], cache, active, budget, temperature, top_k, top_p,
                        row_seeds, gen_slots)

  def _generate_shared(self, params, prefix_ids, prefix_mask, suffix_ids, suffix_mask, active,
                       budget, temperature, top_k, top_p, row_seeds, *, gen_slots: int):
    """Prefills a prefix `[1, L]` that every row shares once, copies its cache to every row,
    prefills each row's suffix `[B, P]` after it, then decodes.

    Both parts are left-padded: a row's suffix padding sits in masked slots between the
    prefix and the suffix, and positions count real tokens only (`positions_from_mask`), so
    every real token has the position and attends to the tokens it has in the whole prompt.
    """
    self.num_compilations += 1  # runs only while tracing
    model = nnx.merge(self._graphdef, params)
    batch, suffix_len = suffix_ids.shape
    cache = KVCache.zeros(self.config, 1, prefix_ids.shape[1] + suffix_len + gen_slots)
    _, cache = model.hidden_states(prefix_ids, attention_mask=prefix_mask, cache=cache)
    cache = KVCache(k=tuple(jnp.broadcast_to(k, (batch, *k.shape[1:])) for k in cache.k),
                    v=tuple(jnp.broadcast_to(v, (batch, *v.shape[1:])) for v in cache.v),
                    mask=jnp.broadcast_to(cache.mask, (batch, cache.slots)), index=cache.index)
    hidden, cache = model.hidden_states(suffix_ids, attention_mask=suffix_mask, cache=cache)
    return self._decode(model, hidden[:, -1], cache, active, budget, temperature, top_k, top_p,
                        row_seeds, gen_slots)

  def _logits(self, model, hidden, keys, step):
    """float32 logits `[B, V]` that rows sample their token number `step` (a scalar, or `[B]`
    per row) from, given hidden states `[B, H]` and the rows' keys `[B]`. The model's own;
    a subclass may reshape them per row (bench/bench_continuous_batching.py forces reply
    lengths this way), and every decode path (`_decode`, `oel_jax.slots`) goes through here."""
    del keys, step
    return _last_logits(model, hidden)

  def _decode(self, model, last_hidden, cache, active, budget, temperature, top_k, top_p,
              row_seeds, gen_slots):
    """The first token from the prompts' last hidden states `[B, H]`, then the decode loop
    until every row stopped or `budget` tokens: `(tokens [B, G], logprobs [B, G], steps)`."""
    batch = last_hidden.shape[0]
    eos = jnp.asarray(self.eos_ids, jnp.int32)
    keys = jax.random.wrap_key_data(row_seeds)  # [B] keys, one stream per row
    logits = self._logits(model, last_hidden, keys, jnp.int32(0))

    def sample(step, logits, done, tokens, logprobs):
      u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(keys)
      tok, lp = sample_next(u, logits, temperature, top_k, top_p)
      tok = jnp.where(done, self.pad_id, tok)
      lp = jnp.where(done, 0.0, lp)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, 1)
      logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, lp[:, None], step, 1)
      return tok, done | jnp.isin(tok, eos), tokens, logprobs

    tokens = jnp.full((batch, gen_slots), self.pad_id, jnp.int32)
    logprobs = jnp.zeros((batch, gen_slots), jnp.float32)
    done = ~active
    tok, done, tokens, logprobs = sample(0, logits, done, tokens, logprobs)

    def cond(carry):
      step, _, done, *_ = carry
      return (step < budget) & ~jnp.all(done)

    def body(carry):
      step, tok, done, tokens, logprobs, cache = carry
      hidden, cache = model.hidden_states(tok[:, None], attention_mask=(~done)[:, None],
                                          cache=cache)
      logits = self._logits(model, hidden[:, 0], keys, step)
      tok, done, tokens, logprobs = sample(step, logits, done, tokens, logprobs)
      return step + 1, tok, done, tokens, logprobs, cache

    carry = (jnp.int32(1), tok, done, tokens, logprobs, cache)
    steps, _, done, tokens, logprobs, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, steps

  # ---- public API ----

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | Sequence[int] = 0, share_prefix: bool = False) -> GenerationOutput:
    """Generates up to `max_new_tokens` for each prompt (a list of token ids, any length).

    `seed`: one integer for the call (row i then draws from the stream of `(seed, i)`), or
    one per prompt, in [0, 2^64): a row's tokens then depend only on its own prompt and
    seed, not on which other prompts share the batch or where it sits in it.

    `share_prefix`: prefill the longest prefix common to all prompts once (batch 1) and start
    every row from a copy of its cache, when it is at least `min_prompt_bucket` tokens (a
    knowledge text in every prompt of an in-context evaluation); each row's own tokens are
    then prefilled after it. The same tokens and log-probabilities as prefilling the whole
    prompts, up to floating-point rounding (different matmul shapes); a separate program per
    (batch, prefix, suffix, new-token) bucket.
    """
    if not prompts:
      return GenerationOutput([], [], [])
    row_seeds = _row_seeds(seed, len(prompts))
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(f"invalid sampling settings: temperature={temperature} (>= 0), "
                       f"top_k={top_k} (>= 0), top_p={top_p} (in (0, 1])")
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
      if n == 0:
        raise ValueError(f"prompt {i} is empty")
      if n + max_new_tokens > self.max_seq_len:
        raise ValueError(f"prompt {i} has {n} tokens; with max_new_tokens={max_new_tokens} "
                         f"it exceeds max_seq_len={self.max_seq_len}")
    # Every row keeps at least its last token as suffix: its logits start the decode.
    shared = min(common_prefix_length(prompts), min(lengths) - 1) if share_prefix else 0
    knobs = (jnp.int32(max_new_tokens), jnp.float32(temperature), jnp.int32(top_k),
             jnp.float32(top_p))
    if shared < max(self.min_prompt_bucket, 1):
      batch, prompt_len, gen_slots = self._buckets(len(prompts), max(lengths), max_new_tokens)
      ids, mask, active, seeds = self._place(self._pad_batch(prompts, row_seeds, prompt_len,
                                                             batch))
      tokens, logprobs, _ = self._jitted(self._params, ids, mask, active, *knobs, seeds,
                                         gen_slots=gen_slots)
    else:
      suffixes = [p[shared:] for p in prompts]
      batch, suffix_len, gen_slots = self._buckets(len(prompts), max(lengths) - shared,
                                                   max_new_tokens, capped=False)
      prefix_len = bucket_size(shared, self.min_prompt_bucket, self.buckets_per_doubling)
      prefix_ids, prefix_mask, _, _ = self._pad_batch([prompts[0][:shared]], row_seeds[:1],
                                                      prefix_len, 1)
      if self.mesh is not None:
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        prefix_ids, prefix_mask = (parallel.place(a, replicated)
                                   for a in (prefix_ids, prefix_mask))
      ids, mask, active, seeds = self._place(self._pad_batch(suffixes, row_seeds, suffix_len,
                                                             batch))
      tokens, logprobs, _ = self._jitted_shared(
          self._params, jnp.asarray(prefix_ids), jnp.asarray(prefix_mask), ids, mask, active,
          *knobs, seeds, gen_slots=gen_slots)
    # Every process gets every row: each one's games go on with them.
    tokens, logprobs = parallel.to_host(tokens), parallel.to_host(logprobs)

    out_tokens, out_logprobs, reasons = [], [], []
    eos = set(self.eos_ids)
    for row in range(len(prompts)):
      toks = tokens[row, :max_new_tokens].tolist()
      stop = next((i for i, t in enumerate(toks) if t in eos), None)
      n = len(toks) if stop is None else stop + 1
      out_tokens.append(toks[:n])
      out_logprobs.append(logprobs[row, :n].tolist())
      reasons.append("length" if stop is None else "stop")
    return GenerationOutput(out_tokens, out_logprobs, reasons)

  def _place(self, arrays: Sequence[np.ndarray]) -> list[jax.Array]:
    """Batch inputs on the device(s): split over the mesh's batch axes when there is one."""
    if self.mesh is None:
      return [jnp.asarray(a) for a in arrays]
    # Every process holds the whole batch (they all play the same games); each places
    # the rows of its own devices.
    return [parallel.place(a, self._batch_sharding()) for a in arrays]

  def _buckets(self, rows: int, longest_prompt: int, max_new_tokens: int, *,
               capped: bool = True) -> tuple[int, int, int]:
    """The program's shapes for a call: padded batch, prompt length and generated slots.

    `capped`: the padded prompt length stays within `max_seq_len - max_new_tokens` (off for
    the suffixes after a shared prefix, whose bound is the whole prompt's)."""
    prompt_len = bucket_size(longest_prompt, self.min_prompt_bucket, self.buckets_per_doubling)
    if capped:
      prompt_len = min(prompt_len, self.max_seq_len - max_new_tokens)
    gen_slots = bucket_size(max_new_tokens, 16)
    batch = bucket_size(rows, self.min_batch_bucket, self.buckets_per_doubling)
    if self.mesh is not None:  # whole rows per batch shard
      shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      batch = -(-batch // shards) * shards
    return batch, prompt_len, gen_slots

  def _batch_sharding(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

  def lower(self, rows: int, prompt_len: int, max_new_tokens: int) -> jax.stages.Lowered:
    """The program `generate` runs for `rows` prompts of up to `prompt_len` tokens, lowered
    for compile-only analysis (memory, collectives); the weights may be abstract."""
    if min(rows, prompt_len, max_new_tokens) < 1 or prompt_len + max_new_tokens > self.max_seq_len:
      raise ValueError(f"lower: rows={rows}, prompt_len={prompt_len} and max_new_tokens="
                       f"{max_new_tokens} must be >= 1, prompt_len + max_new_tokens <= "
                       f"max_seq_len={self.max_seq_len}")
    batch, prompt_len, gen_slots = self._buckets(rows, prompt_len, max_new_tokens)
    sharding = None if self.mesh is None else self._batch_sharding()
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=getattr(x, "sharding", None)),
                          self._params)
    return self._jitted.lower(
        params, spec((batch, prompt_len), jnp.int32), spec((batch, prompt_len), jnp.int32),
        spec((batch,), jnp.bool_), jnp.int32(max_new_tokens), jnp.float32(1.0), jnp.int32(0),
        jnp.float32(1.0), spec((batch, 2), jnp.uint32), gen_slots=gen_slots)

  def _pad_batch(self, prompts: Sequence[Sequence[int]], row_seeds: np.ndarray,
                 prompt_len: int, batch: int) -> tuple[np.ndarray, ...]:
    """The jitted program's batch inputs: `(ids, mask, active, seeds)` as NumPy arrays.

    Prompts are left-padded to `prompt_len`; rows past the prompts, up to `batch`, are
    inactive fillers.
    """
    ids = np.full((batch, prompt_len), self.pad_id, np.int32)
    mask = np.zeros((batch, prompt_len), np.int32)
    for row, prompt in enumerate(prompts):
      ids[row, prompt_len - len(prompt):] = np.asarray(prompt, np.int32)
      mask[row, prompt_len - len(prompt):] = 1
    if np.any((ids < 0) | (ids >= self.config.vocab_size)):
      row = int(np.argwhere((ids < 0) | (ids >= self.config.vocab_size))[0, 0])
      raise ValueError(f"prompt {row} holds a token id outside [0, {self.config.vocab_size})")
    mask[len(prompts):, -1] = 1  # filler rows: one real token, inactive from the start
    active = np.arange(batch) < len(prompts)

    seeds = np.zeros((batch, 2), np.uint32)  # threefry key data: (high, low) words
    seeds[:len(prompts), 0] = row_seeds >> np.uint64(32)
    seeds[:len(prompts), 1] = row_seeds & np.uint64(0xFFFFFFFF)
    return ids, mask, active, seeds

  def generate_chat(self, tokenizer: Any, conversations: Sequence[Sequence[dict]], *,
                    enable_thinking: bool, **generate_kwargs) -> list[ChatCompletion]:
    """Chat messages -> the tokenizer's chat template -> generate -> decoded, split replies.

    `generate_kwargs` are those of `generate` (max_new_tokens, temperature, ...).
    """
    prompts = [chat.encode_chat(tokenizer, messages, enable_thinking=enable_thinking)
               for messages in conversations]
    out = self.generate(prompts, **generate_kwargs)
    replies = []
    for tokens, logprobs, reason in zip(out.tokens, out.logprobs, out.finish_reasons):
      text = tokenizer.decode(tokens, skip_special_tokens=True)
      reasoning, answer = chat.split_reasoning(text)
      replies.append(ChatCompletion(text, reasoning, answer, tokens, logprobs, reason))
    return replies


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
  """How many leading tokens all `prompts` have in common (the whole prompt for one)."""
  first = np.asarray(prompts[0])
  n = min(len(p) for p in prompts)
  for prompt in prompts[1:]:
    differ = np.flatnonzero(np.asarray(prompt[:n]) != first[:n])
    if differ.size:
      n = int(differ[0])
  return n


def decode_loop(compiled_hlo: str) -> tuple[dict[str, list[parallel.HloInstruction]],
                                             tuple[str, ...]]:
  """The computations of a compiled `Sampler` program (`parallel.parse_hlo`) and those of
  its decode loop, which run once per generated token: the body and condition of the entry
  computation's while loop that carries the most bytes (its carry holds the KV cache)."""
  computations = parallel.parse_hlo(compiled_hlo)
  loops = [inst for inst in computations["ENTRY"] if inst.opcode == "while"]
  if not loops:
    raise ValueError("decode_loop: the program's entry computation has no while loop")
  decode = max(loops, key=lambda inst: sum(a.bytes for a in inst.results))
  return computations, decode.called


def decode_step_collectives(compiled_hlo: str) -> tuple[list[parallel.HloInstruction], int]:
  """The collectives a decode step of a compiled `Sampler` program may run (in any branch),
  and the bytes one step moves per device (the costliest branch of each conditional)."""
  computations, loop = decode_loop(compiled_hlo)
  return ([inst for name in loop for inst in parallel.collectives(computations, name)],
          sum(parallel.collective_bytes(computations, name) for name in loop))


def weight_gathers(collectives: Sequence[parallel.HloInstruction], params: Any,
                   mesh: jax.sharding.Mesh) -> list[parallel.HloInstruction]:
  """The all-gathers among `collectives` that assemble a whole weight matrix of `params`
  (or its share of one tp shard): as many elements as the matrix, or the matrix over a
  divisor of the tp axis. In a decode step that means weights gathered over fsdp every
  token, where moving activations instead would move a tiny fraction of those bytes."""
  tp = mesh.shape["tp"]
  sizes = {math.prod(p.shape) // k for p in jax.tree.leaves(params) if len(p.shape) >= 2
           for k in range(1, tp + 1) if tp % k == 0}
  return [inst for inst in collectives
          if inst.collective == "all-gather" and any(a.size in sizes for a in inst.results)]
