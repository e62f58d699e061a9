"""`oel_jax.compiled_hlo`: dots by operand type and the bytes each kernel reads, from
programs XLA:CPU compiles here, checked against what each program must do."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oel_jax import compiled_hlo, parallel
from oel_jax.models import Qwen3Config, init_model
from oel_jax.sampling import Sampler, decode_loop


def _hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def test_dots_name_their_operand_types():
  a = jnp.ones((64, 256), jnp.bfloat16)
  b = jnp.ones((256, 128), jnp.bfloat16)
  mixed = _hlo(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32), a, b)
  wide = _hlo(lambda a, b: jnp.dot(a, b), a.astype(jnp.float32), b.astype(jnp.float32))
  assert [d.types for d in compiled_hlo.dots(mixed)] == ["bf16 x bf16 -> f32"]
  assert [d.types for d in compiled_hlo.dots(wide)] == ["f32 x f32 -> f32"]
  (dot,) = compiled_hlo.dots(mixed)
  assert sorted(dot.operands) == ["bf16[256,128]", "bf16[64,256]"]
  assert dot.result == "f32[64,128]"
  assert "dot_general" in dot.op_name


def _reads_in_loop(hlo: str) -> dict[str, int]:
  """Bytes per loop iteration that the loop body's fused kernels read, by parameter type."""
  computations = parallel.parse_hlo(hlo)
  loop = next(i for i in computations["ENTRY"] if i.opcode == "while")
  reads_of = compiled_hlo.kernel_reads(hlo)
  totals = {}
  for name in loop.called:
    for inst in computations[name]:
      if inst.opcode == "fusion" and inst.called:
        for typ, size in reads_of[inst.called[0]]:
          totals[typ] = totals.get(typ, 0) + size
  return totals


def test_kernel_reads_count_whole_arrays_gathered_rows_and_in_place_updates():
  table = jnp.ones((4096, 256), jnp.float32)  # 4 MiB
  buffer = jnp.zeros((2048, 256), jnp.float32)
  ids = jnp.arange(8, dtype=jnp.int32)
  table_bytes, row_bytes = 4096 * 256 * 4, 8 * 256 * 4

  def gather_rows(t, buf):
    def body(i, buf):
      rows = jnp.take(t, (ids + i) % 4096, axis=0)  # 8 rows of the table
      return jax.lax.dynamic_update_slice(buf, rows, (i, 0))  # written in place
    return jax.lax.fori_loop(0, 3, body, buf)

  def scale_table(t, carry):
    return jax.lax.fori_loop(0, 3, lambda i, c: c + t * i.astype(jnp.float32), carry)

  reads = _reads_in_loop(_hlo(gather_rows, table, buffer))
  assert reads["f32[4096,256]"] == row_bytes
  assert reads.get("f32[2048,256]", 0) == 0  # the buffer: no kernel reads it
  reads = _reads_in_loop(_hlo(scale_table, table, table))
  assert reads["f32[4096,256]"] == 2 * table_bytes  # the table and the carry, each whole


def test_a_bf16_samplers_decode_step_reads_each_weight_and_the_cache_once():
  """What `bench/tpu_compile.py` reports for Qwen3-0.6B's widths, on a small model: per
  generated token the decode loop's kernels read every weight matrix once (the embedding
  table twice: the LM head's whole read, and the new tokens' rows) and the KV cache once."""
  config = Qwen3Config(vocab_size=1000, hidden_size=96, intermediate_size=160, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=32, param_dtype=jnp.bfloat16,
                       compute_dtype=jnp.bfloat16)
  model = init_model(config)
  sampler = Sampler(model, eos_ids=[1], pad_id=0, max_seq_len=64)
  hlo = sampler.lower(16, 32, 16).compile().as_text()
  computations, loop = decode_loop(hlo)
  reads_of = compiled_hlo.kernel_reads(hlo)
  per_size = {}
  for name in loop:
    for inst in computations[name]:
      if inst.opcode == "fusion" and inst.called:
        for typ, size in reads_of[inst.called[0]]:
          elements = math.prod(int(d) for d in typ.split("[")[1].rstrip("]").split(",") if d)
          per_size[elements] = per_size.get(elements, 0) + size
  weights = [p for p in jax.tree.leaves(nnx.state(model)) if p.ndim == 2]
  counts = {}
  for p in weights:
    counts[p.size] = counts.get(p.size, 0) + p.size * p.dtype.itemsize
  rows = 16 * config.hidden_size * 2  # the gathered embedding rows
  for size, weight_bytes in counts.items():
    expected = weight_bytes + (rows if size == config.vocab_size * config.hidden_size else 0)
    assert per_size.get(size) == expected, (size, per_size.get(size), expected)
  cache_elements = 16 * config.num_kv_heads * 48 * config.head_dim  # 32 prompt + 16 new slots
  cache_bytes = 2 * config.num_layers * cache_elements * 2
  assert per_size.get(cache_elements) == cache_bytes
  assert np.all([d.types == "bf16 x bf16 -> f32"
                 for d in compiled_hlo.dots(hlo)
                 if d.computation in {c for n in loop for c in parallel.reachable(
                     computations, n)}])
