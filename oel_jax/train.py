"""The consolidation train step: on-policy context distillation against a frozen teacher.

One jitted program per step: the frozen teacher (knowledge + prefix + response) and the
student (prefix + response) run forward, their final hidden states at the response
positions are aligned, the top-k reverse KL (`oel_jax.losses`, DESIGN.md 5.3) is computed
in memory-bounded token chunks, and AdamW updates the student. A batch larger than fits is
split into micro-batches whose gradients accumulate into the one optimizer step, so the
loss stays the token-mean over the whole batch.

Alignment. Logits at position t predict token t + 1, so the response token j (at
sequence position p_j) is scored by the hidden state at p_j - 1 in each model.
`DistillBatch` carries those indices explicitly for both sequences, so the student and the
teacher may pad and prefix differently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from oel_jax import losses, parallel, settings, teacher_prefix
from oel_jax.models.qwen3 import FSDP, TP, Qwen3
from oel_jax.teacher_prefix import KnowledgePrefix, PrefixKV


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer and loss settings of consolidation (paper Table 3/4 defaults)."""

  learning_rate: float = settings.number(1e-6, minimum=0)
  """Constant learning rate (no warm-up); 0 leaves the weights as they are (a control run:
  everything else, sampling included, runs as usual)."""
  weight_decay: float = settings.number(0.01, minimum=0)
  """AdamW decoupled weight decay."""
  b1: float = settings.number(0.9, minimum=0, maximum=1)
  """AdamW first-moment decay."""
  b2: float = settings.number(0.999, minimum=0, maximum=1)
  """AdamW second-moment decay."""
  eps: float = settings.number(1e-8, minimum=0)
  """AdamW epsilon."""
  max_grad_norm: float = settings.number(1.0, minimum=0, exclusive=True)
  """Global-norm gradient clipping threshold."""
  divergence: str = settings.choice(losses.TOPK_REVERSE_KL, losses.DIVERGENCES)
  """One of `oel_jax.losses.DIVERGENCES` (forward KL for off-policy distillation)."""
  k: int = settings.integer(256, minimum=0)
  """Top-k support size; 0 for the full vocabulary."""
  temperature: float = settings.number(0.7, minimum=0, exclusive=True)
  """The sampling temperature, applied to both models' logits (DESIGN.md 5.3); > 0, since
  the loss divides the logits by it."""
  renormalize: bool = settings.boolean(False)
  """Renormalise both distributions over the top-k support."""
  tail: bool = settings.boolean(False)
  """Add a tail bucket for the mass outside the support S, making the loss the KL of the two
  distributions coarse-grained to S plus one bucket (`oel_jax.losses`; >= 0, unlike the
  truncated sum). Off: the official loss. Reverse-KL divergences only, not with
  `renormalize`."""
  micro_batches: int = settings.integer(1, minimum=1)
  """Split each batch into this many micro-batches (gradient accumulation)."""
  loss_chunk_size: int = settings.integer(256, minimum=1)
  """Tokens per chunk in the memory-bounded loss."""
  vocab_chunk_size: int = settings.integer(8192, minimum=1)
  """Vocabulary rows per tile in the loss's backward pass."""

  def __post_init__(self):
    settings.check(self)

  def cross_checks(self, at: settings.At) -> list[str]:
    """The tail bucket's conditions."""
    out = []
    if at.ok("tail", "renormalize") and self.tail and self.renormalize:
      out.append(f"{at('tail')} and {at('renormalize')} cannot both be set: renormalised over "
                 "the support there is no tail bucket")
    if at.ok("tail", "divergence") and self.tail and self.divergence == losses.FORWARD_KL:
      out.append(f"{at('tail')} is implemented for the reverse-KL divergences, not "
                 f"{losses.FORWARD_KL!r}")
    return out

  def optimizer(self) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(self.max_grad_norm),
        optax.adamw(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                    weight_decay=self.weight_decay))


@flax.struct.dataclass
class DistillBatch:
  """One consolidation batch (B rows). Sequences are right-padded."""

  student_ids: jax.Array
  """`[B, Ts]` int32: prefix (no knowledge) + response."""
  student_mask: jax.Array
  """`[B, Ts]` int32: 1 for real tokens."""
  teacher_ids: jax.Array
  """`[B, Tt]` int32: knowledge + prefix + the same response."""
  teacher_mask: jax.Array
  """`[B, Tt]` int32."""
  student_index: jax.Array
  """`[B, R]` int32: position whose logits predict response token j, in the student."""
  teacher_index: jax.Array
  """`[B, R]` int32: the same for the teacher."""
  response_mask: jax.Array
  """`[B, R]` float32: 1 for response tokens scored (up to and including the first end)."""
  teacher_context: jax.Array | None = None
  """`[B]` int32, or None: the knowledge text (`KnowledgePrefix` row) whose cached prefix
  each teacher row continues; then `teacher_ids` holds only the tokens after it
  (`with_teacher_prefix`). None: `teacher_ids` holds whole teacher sequences."""
  teacher_prefix_len: jax.Array | None = None
  """`[B]` int32, or None: how many cached tokens each teacher row uses (its `teacher_ids`
  sit at positions from there on; `teacher_index` counts within `teacher_ids`)."""

  @property
  def batch_size(self) -> int:
    return self.student_ids.shape[0]


def make_batch(student_prompts, teacher_prompts, responses, *, pad_id: int,
               student_len: int | None = None, teacher_len: int | None = None,
               response_len: int | None = None) -> DistillBatch:
  """Builds a `DistillBatch` from token-id lists (host side, NumPy).

  Row i is student `student_prompts[i] + responses[i]` and teacher `teacher_prompts[i] +
  responses[i]`; lengths pad to the given sizes (default: the longest row), so that
  callers can bucket shapes and avoid recompiling.
  """
  if not len(student_prompts) == len(teacher_prompts) == len(responses):
    raise ValueError(f"make_batch: {len(student_prompts)} student prompts, "
                     f"{len(teacher_prompts)} teacher prompts, {len(responses)} responses")
  for i, r in enumerate(responses):
    if not r:
      raise ValueError(f"make_batch: response {i} is empty")
  b = len(responses)
  ts = student_len or max(len(p) + len(r) for p, r in zip(student_prompts, responses))
  tt = teacher_len or max(len(p) + len(r) for p, r in zip(teacher_prompts, responses))
  rl = response_len or max(len(r) for r in responses)
  out = {name: np.zeros((b, n), np.int32) for name, n in
         [("student_ids", ts), ("student_mask", ts), ("teacher_ids", tt),
          ("teacher_mask", tt), ("student_index", rl), ("teacher_index", rl)]}
  out["student_ids"][:] = pad_id
  out["teacher_ids"][:] = pad_id
  response_mask = np.zeros((b, rl), np.float32)
  for i, (sp, tp, r) in enumerate(zip(student_prompts, teacher_prompts, responses)):
    for side, prompt, n in (("student", sp, ts), ("teacher", tp, tt)):
      if not prompt:
        raise ValueError(f"make_batch: {side} prompt {i} is empty")
      if len(prompt) + len(r) > n:
        raise ValueError(f"make_batch: row {i} {side} sequence has {len(prompt) + len(r)} "
                         f"tokens, more than the padded length {n}")
      if len(r) > rl:
        raise ValueError(f"make_batch: response {i} has {len(r)} tokens > {rl}")
      seq = list(prompt) + list(r)
      out[f"{side}_ids"][i, :len(seq)] = seq
      out[f"{side}_mask"][i, :len(seq)] = 1
      out[f"{side}_index"][i, :len(r)] = np.arange(len(prompt) - 1, len(seq) - 1)
    response_mask[i, :len(r)] = 1.0
  return DistillBatch(**{k: jnp.asarray(v) for k, v in out.items()},
                      response_mask=jnp.asarray(response_mask))


def with_teacher_prefix(student_prompts, teacher_prompts, responses, contexts,
                        prefix: KnowledgePrefix | Sequence[Sequence[int]], *, pad_id: int,
                        student_len: int | None = None, teacher_len: int | None = None,
                        response_len: int | None = None) -> DistillBatch:
  """`make_batch` for a teacher that continues cached knowledge prefixes.

  Row i's teacher prompt (``teacher_prompts[i]``, whole, as for `make_batch`) draws knowledge
  text ``contexts[i]``; the tokens it shares with that text's cached prefix (``prefix.ids``,
  or the ids themselves) are left to the cache and the rest make its `teacher_ids`
  (``teacher_len`` pads those). Same loss and gradients as `make_batch`'s whole sequences.
  """
  ids = prefix.ids if isinstance(prefix, KnowledgePrefix) else prefix
  rest, used = teacher_prefix.split_prompts(teacher_prompts, contexts, ids)
  batch = make_batch(student_prompts, rest, responses, pad_id=pad_id, student_len=student_len,
                     teacher_len=teacher_len, response_len=response_len)
  return batch.replace(teacher_context=jnp.asarray(np.asarray(contexts, np.int32)),
                       teacher_prefix_len=jnp.asarray(np.asarray(used, np.int32)))


@flax.struct.dataclass
class TrainState:
  """The student's parameters, its optimizer state and the step count."""

  params: Any
  """The student's `nnx.State` of parameters (float32 master weights)."""
  opt_state: Any
  """AdamW state mirroring `params`."""
  step: jax.Array
  """Scalar int32: optimizer steps taken."""


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient was NaN or infinite; `.state` is the unchanged train state.

  Raised by `Trainer.train_step` (unless ``skip_non_finite``), and by
  `oel_jax.consolidate.run_consolidation` after too many consecutive skipped steps.
  """

  def __init__(self, message: str, state: "TrainState"):
    super().__init__(message)
    self.state = state


# Step metrics that are token means over the scored tokens: metric name -> TokenStats field.
_TOKEN_STATS = {
    "student_entropy": "student_entropy",
    "teacher_entropy": "teacher_entropy",
    "student_topk_mass": "student_support_mass",
    "teacher_topk_mass": "teacher_support_mass",
}


def _gather(hidden: jax.Array, index: jax.Array) -> jax.Array:
  """`[B, T, H]` at `[B, R]` positions -> `[B, R, H]`."""
  return jnp.take_along_axis(hidden, index[..., None], axis=1)


def _head(model: Qwen3) -> jax.Array:
  """The model's unembedding `[V, H]` as the loss multiplies it: in a 16-bit compute dtype
  cast to it, as `Qwen3.logits` does (bf16 matmuls, float32 accumulation and logits; the
  float32 master weights' gradient arrives through the cast), else as stored."""
  w = model.unembedding()
  dtype = model.config.compute_dtype
  return w.astype(dtype) if jnp.dtype(dtype).itemsize == 2 else w


def apply_optimizer(config: TrainConfig, tx: optax.GradientTransformation, grads, opt_state,
                    params, finite: jax.Array):
  """`(params, opt_state)` after one step of `tx = config.optimizer()`, or the inputs
  unchanged where `finite` (a bool scalar) is False: bit for bit `optax.apply_updates(params,
  tx.update(grads, opt_state, params)[0])` and the new state, each `jnp.where(finite, new,
  old)`.

  Written so that XLA reads each parameter-sized array once and writes it once. Selected
  directly, the new parameters recompute AdamW's new moments from the old ones inside their
  own fusion, and since the moments' buffers are donated and overwritten in place by the
  moments' fusions, XLA first copies the old moments: for the `[V, H]` table that is two
  extra passes, and the moments read twice. Here the moments are computed and selected
  first (by optax), materialised (an optimisation barrier), and the update is taken from
  the selected moments: the same numbers where `finite` (they are the new moments) and
  unused where not (the old parameters are kept).
  """
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  _, new_state = tx.update(grads, opt_state, params)  # the update itself is rebuilt below
  new_state = jax.lax.optimization_barrier(keep(new_state, opt_state))
  adam = new_state[1][0]
  if not isinstance(adam, optax.ScaleByAdamState):
    raise TypeError(f"apply_optimizer expects TrainConfig.optimizer()'s chain (clip, AdamW); "
                    f"its second state is {type(adam).__name__}")
  # optax.scale_by_adam's update from its new moments (eps_root 0), then the chain's
  # stateless tail: weight decay and the learning rate, by optax's own transforms.
  mu_hat = optax.tree.bias_correction(adam.mu, config.b1, adam.count)
  nu_hat = optax.tree.bias_correction(adam.nu, config.b2, adam.count)
  updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + config.eps), mu_hat, nu_hat)
  updates, _ = optax.add_decayed_weights(config.weight_decay).update(
      updates, optax.EmptyState(), params)
  updates, _ = optax.scale_by_learning_rate(config.learning_rate).update(
      updates, optax.EmptyState())
  return keep(optax.apply_updates(params, updates), params), new_state


class Trainer:
  """Builds and runs the jitted consolidation step for one model architecture.

  Args:
    student: the model to train (its graph is reused for the teacher).
    config: optimizer and loss settings.
    mesh: device mesh (axes data, fsdp, tp); None for the default device.
  """

  def __init__(self, student: Qwen3, config: TrainConfig = TrainConfig(),
               mesh: Mesh | None = None):
    self.config = config
    self.model_config = student.config
    self.mesh = mesh
    self.graphdef, params = nnx.split(student)
    self.tx = config.optimizer()
    self._check_config()
    if mesh is not None:
      self.param_sharding = jax.tree.map(
          lambda spec: NamedSharding(mesh, spec), nnx.get_partition_spec(params))
      for path, var in nnx.to_flat_state(params):
        parallel.param_sharding(path, var, mesh)  # divisibility, with a clear error
      abstract_opt = jax.eval_shape(self.tx.init, params)
      replicated = NamedSharding(mesh, P())
      self.opt_sharding = optax.tree_map_params(
          self.tx, lambda _, s: s, abstract_opt, self.param_sharding,
          transform_non_params=lambda _: replicated)
      self.batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
      # Cached knowledge prefixes [C, K, P, D], sharded like the weights: heads split over
      # tp as the attention's are, slots over fsdp (all C texts on every shard, since any
      # row may draw any one); like a layer's weights, each layer's slots are gathered when
      # the teacher's forward reaches it.
      self.prefix_sharding = NamedSharding(mesh, P(None, TP, FSDP))
      self.state_sharding = TrainState(params=self.param_sharding,
                                       opt_state=self.opt_sharding, step=replicated)
    self._step = self._build_step()
    self._prefill = self._build_prefill()
    self.num_compilations = 0

  # ---- checks ----

  def _check_config(self):
    c, v = self.model_config, self.model_config.vocab_size
    if self.config.k > v:
      raise ValueError(f"TrainConfig.k ({self.config.k}) exceeds the vocabulary ({v})")
    if self.mesh is not None:
      tp = self.mesh.shape["tp"]
      for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(c, name) % tp:
          raise ValueError(f"Qwen3Config.{name} ({getattr(c, name)}) is not divisible by "
                           f"mesh axis 'tp' ({tp})")

  def check_batch(self, batch: DistillBatch):
    """Raises before compiling when the batch cannot be split as configured."""
    b, m = batch.batch_size, self.config.micro_batches
    if b % m:
      raise ValueError(f"batch size {b} is not divisible by micro_batches ({m})")
    if self.mesh is not None:
      shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      if (b // m) % shards:
        raise ValueError(f"micro-batch size {b // m} (batch {b} / {m} micro-batches) is not "
                         f"divisible by mesh axes data x fsdp ({shards})")

  def check_prefix(self, batch: DistillBatch, prefix: KnowledgePrefix | None):
    """Raises unless the batch's teacher rows and the cached prefixes go together."""
    if (batch.teacher_context is None) != (batch.teacher_prefix_len is None):
      raise ValueError("DistillBatch.teacher_context and teacher_prefix_len must be set "
                       "together (see with_teacher_prefix)")
    if batch.teacher_context is None:
      if prefix is not None:
        raise ValueError("train_step got teacher_prefix, but the batch's teacher rows are "
                         "whole sequences (build it with with_teacher_prefix)")
      return
    if prefix is None:
      raise ValueError("the batch's teacher rows continue cached knowledge prefixes "
                       "(DistillBatch.teacher_context is set): pass teacher_prefix=, the "
                       "KnowledgePrefix they were split with")
    contexts, used = np.asarray(batch.teacher_context), np.asarray(batch.teacher_prefix_len)
    lengths = np.asarray([len(i) for i in prefix.ids])
    bad = (contexts < 0) | (contexts >= len(lengths))
    if bad.any():
      raise ValueError(f"DistillBatch.teacher_context row {int(np.argmax(bad))} names text "
                       f"{int(contexts[bad][0])}; the prefix caches {len(lengths)} texts")
    bad = (used < 0) | (used > lengths[contexts])
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(f"DistillBatch.teacher_prefix_len row {i} is {int(used[i])}, but text "
                       f"{int(contexts[i])}'s cached prefix has {int(lengths[contexts[i]])} "
                       "tokens")

  # ---- state ----

  def init_state(self, student: Qwen3) -> TrainState:
    """A fresh train state from the student's current weights (placed on the mesh)."""
    # A copy: the step donates the state's buffers, which must not be the model's own.
    copy = lambda p: jax.tree.map(jnp.copy, p)
    params = nnx.state(student)
    if self.mesh is not None:
      params = jax.jit(copy, out_shardings=self.param_sharding)(params)
      opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sharding)(params)
      step = parallel.place(np.zeros((), np.int32), NamedSharding(self.mesh, P()))
    else:
      params = jax.jit(copy)(params)
      opt_state, step = self.tx.init(params), jnp.zeros((), jnp.int32)
    return TrainState(params=params, opt_state=opt_state, step=step)

  def teacher_params(self, teacher: Qwen3) -> Any:
    """The frozen teacher's parameters, placed like the student's."""
    params = nnx.state(teacher)
    if self.mesh is not None:
      params = jax.device_put(params, self.param_sharding)
    return params

  def knowledge_prefix(self, teacher_params: Any, prefix_ids: Sequence[Sequence[int]], *,
                       pad_id: int = 0, length: int | None = None) -> KnowledgePrefix:
    """The frozen teacher's keys and values over each knowledge text's prompt prefix.

    Run once per round; `train_step` (with ``teacher_prefix=``) then computes only what
    follows the prefix in each teacher row (`with_teacher_prefix`).

    Args:
      teacher_params: `teacher_params`' result.
      prefix_ids: per knowledge text, the token ids its teacher prompts start with.
      pad_id: the token right-padding the prefixes (masked).
      length: cached slots (default: the longest prefix; bucket it to reuse the program);
        under a mesh, rounded up to a multiple of its fsdp axis (the slots split over it).
    """
    if not len(prefix_ids):
      raise ValueError("knowledge_prefix: no prefixes (one per knowledge text)")
    c = len(prefix_ids)
    p = max(len(x) for x in prefix_ids) if length is None else length
    if p < max(len(x) for x in prefix_ids):
      raise ValueError(f"knowledge_prefix: length {p} is shorter than the longest prefix "
                       f"({max(len(x) for x in prefix_ids)} tokens)")
    rows, p = c, max(p, 1)
    if self.mesh is not None:  # rows split over the batch axes like a batch's
      shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      rows = -(-c // shards) * shards
      p = -(-p // self.mesh.shape["fsdp"]) * self.mesh.shape["fsdp"]
    ids = np.full((rows, p), pad_id, np.int32)
    mask = np.zeros((rows, p), np.int32)
    for i, x in enumerate(prefix_ids):
      ids[i, :len(x)] = x
      mask[i, :len(x)] = 1
    if self.mesh is not None:
      ids, mask = (parallel.place(a, self.batch_sharding) for a in (ids, mask))
    with self._mesh_context():
      kv = self._prefill(teacher_params, jnp.asarray(ids), jnp.asarray(mask), c)
    return KnowledgePrefix(ids=tuple(tuple(int(t) for t in x) for x in prefix_ids), kv=kv)

  def _build_prefill(self) -> Callable:
    def run(teacher_params, ids, mask, count):
      kv = teacher_prefix.prefill(nnx.merge(self.graphdef, teacher_params), ids, mask)
      return jax.tree.map(lambda a: a[:count], kv)

    if self.mesh is None:
      return jax.jit(run, static_argnums=3)
    return jax.jit(run, static_argnums=3,
                   in_shardings=(self.param_sharding, self.batch_sharding, self.batch_sharding),
                   out_shardings=self.prefix_sharding)

  def student(self, state: TrainState) -> Qwen3:
    """The student model at `state` (shares its arrays)."""
    return nnx.merge(self.graphdef, state.params)

  # ---- the step ----

  def _loss_stats(self, params, teacher_params, batch: DistillBatch, prefix_kv: PrefixKV | None):
    """Sum of per-token divergences, and sums of token statistics, over one micro-batch."""
    cfg = self.config
    student = nnx.merge(self.graphdef, params)
    teacher = nnx.merge(self.graphdef, teacher_params)
    hs, _ = student.hidden_states(batch.student_ids, attention_mask=batch.student_mask)
    if prefix_kv is None:
      ht, _ = teacher.hidden_states(batch.teacher_ids, attention_mask=batch.teacher_mask)
    else:
      ht = teacher_prefix.hidden_states_with_prefix(
          teacher, prefix_kv, batch.teacher_ids, batch.teacher_mask, batch.teacher_context,
          batch.teacher_prefix_len)
    ht = jax.lax.stop_gradient(ht)
    stats = losses.per_token_divergence_from_hidden(
        _gather(hs, batch.student_index), _head(student),
        _gather(ht, batch.teacher_index), jax.lax.stop_gradient(_head(teacher)),
        divergence=cfg.divergence, k=cfg.k, temperature=cfg.temperature,
        renormalize=cfg.renormalize, tail=cfg.tail, chunk_size=cfg.loss_chunk_size,
        vocab_chunk_size=cfg.vocab_chunk_size, with_entropy=True)
    w = batch.response_mask
    total = jnp.sum(stats.divergence * w)
    return total, {name: jnp.sum(getattr(stats, field) * w)
                   for name, field in _TOKEN_STATS.items()}

  def _build_step(self) -> Callable:
    m = self.config.micro_batches

    def step(state: TrainState, teacher_params, batch: DistillBatch, prefix_kv):
      self.num_compilations += 1  # runs only while tracing
      tokens = jnp.sum(batch.response_mask)
      denom = jnp.maximum(tokens, 1.0)
      grad_fn = jax.value_and_grad(self._loss_stats, has_aux=True)
      # Strided micro-batches (micro-batch j = rows j, j + m, ...): each device already
      # holds its share of every micro-batch, so splitting moves no data.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)
      if self.mesh is not None:  # rows of each micro-batch split over the devices, not
        # whole micro-batches per device (what the reshape alone would let XLA pick)
        spec = NamedSharding(self.mesh, P(None, ("data", "fsdp")))
        micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), micro)

      def accumulate(carry, mb):
        grads, loss, sums = carry
        (l, s), g = grad_fn(state.params, teacher_params, mb, prefix_kv)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        if self.mesh is not None:  # accumulate sharded like the parameters
          grads = jax.lax.with_sharding_constraint(grads, self.param_sharding)
        return (grads, loss + l, jax.tree.map(jnp.add, sums, s)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      if self.mesh is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, self.param_sharding)
      init = (zeros, jnp.float32(0), {name: jnp.float32(0) for name in _TOKEN_STATS})
      if m == 1:
        (grads, loss, sums), _ = accumulate(init, jax.tree.map(lambda x: x[0], micro))
      else:
        (grads, loss, sums), _ = jax.lax.scan(accumulate, init, micro)
      grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
      loss = loss / denom
      grad_norm = optax.global_norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      params, opt_state = apply_optimizer(self.config, self.tx, grads, state.opt_state,
                                          state.params, finite)
      new_state = TrainState(params=params, opt_state=opt_state,
                             step=state.step + finite.astype(jnp.int32))
      metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens,
                 **{name: total / denom for name, total in sums.items()}}
      return new_state, metrics

    if self.mesh is None:
      return jax.jit(step, donate_argnums=(0,))
    # One sharding for every leaf of the batch (rows split) and of the prefix (heads split);
    # also for their absent (None) fields.
    return jax.jit(step, donate_argnums=(0,),
                   in_shardings=(self.state_sharding, self.param_sharding, self.batch_sharding,
                                 self.prefix_sharding),
                   out_shardings=(self.state_sharding, NamedSharding(self.mesh, P())))

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def lower(self, state, teacher_params, batch, prefix_kv: PrefixKV | None = None):
    """The lowered step for abstract or concrete inputs (compile-only analysis)."""
    with self._mesh_context():
      return self._step.lower(state, teacher_params, batch, prefix_kv)

  def train_step(self, state: TrainState, teacher_params: Any, batch: DistillBatch, *,
                 teacher_prefix: KnowledgePrefix | None = None,
                 skip_non_finite: bool = False) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step. `state` is donated: use the returned one.

    A step whose loss or gradient norm is not finite updates nothing: parameters, optimizer
    state and ``state.step`` stay exactly as they were.

    Args:
      state: the train state (donated).
      teacher_params: the frozen teacher's parameters (`teacher_params`).
      batch: the step's batch.
      teacher_prefix: the round's cached knowledge prefixes (`knowledge_prefix`), for a
        batch built by `with_teacher_prefix`; None for one built by `make_batch`.
      skip_non_finite: return normally from a non-finite step (the unchanged state, and
        metrics with ``finite`` False) instead of raising; what the official code does.

    Returns:
      The new state and the step's metrics: floats ``loss``, ``grad_norm``, ``tokens``
      (scored tokens), the token means over them of ``student_entropy``,
      ``teacher_entropy`` (full-vocabulary entropies at the loss temperature),
      ``student_topk_mass`` and ``teacher_topk_mass`` (each model's probability mass on the
      loss's support S; 1 for the full vocabulary), ``step_time``, ``tokens_per_second``;
      and the bool ``finite``.

    Raises:
      NonFiniteLossError: the loss or gradient norm was not finite (and not
        ``skip_non_finite``); nothing was updated and the error's `.state` equals the input
        state.
    """
    self.check_batch(batch)
    self.check_prefix(batch, teacher_prefix)
    prefix_kv = None if teacher_prefix is None else teacher_prefix.kv
    if self.mesh is not None:  # every process holds the whole batch; each places its rows
      batch = jax.tree.map(lambda a: parallel.place(a, self.batch_sharding), batch)
    start = time.perf_counter()
    with self._mesh_context():
      new_state, metrics = self._step(state, teacher_params, batch, prefix_kv)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["step_time"] = time.perf_counter() - start
    metrics["tokens_per_second"] = metrics["tokens"] / metrics["step_time"]
    # The same test as the jitted step's (which decided whether the state moved).
    metrics["finite"] = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    if not metrics["finite"] and not skip_non_finite:
      raise NonFiniteLossError(
          f"non-finite loss {metrics['loss']} / grad norm {metrics['grad_norm']} at step "
          f"{int(new_state.step)}; parameters and optimizer state were not updated (the "
          "exception's .state holds them; skip_non_finite=True skips such steps)", new_state)
    return new_state, metrics
