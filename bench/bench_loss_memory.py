"""Peak memory of the top-k reverse-KL loss: plain (full logits) vs chunked, compile only.

Both forms take the same inputs, the final hidden states and the unembedding of student and
teacher, and compute the loss with its gradient with respect to the student's hidden states
and unembedding (so the backward pass is included):

- plain:   logits = hidden @ unembed.T inside the jitted function, then
           `oel_jax.losses.topk_reverse_kl` on the `[B, T, V]` float32 logits;
- chunked: `oel_jax.losses.topk_reverse_kl_from_hidden` (token chunks, recomputation).

Nothing runs: each program is compiled with `jax.jit(f).lower(ShapeDtypeStruct...)
.compile()` and XLA's `memory_analysis()` gives the bytes it plans for temporaries,
arguments and outputs. Defaults are Qwen3 shapes from issue 4: V = 151,936, hidden 2048,
T = 4096, batch 1, k = 256, bf16 hidden states and unembeddings.

  python bench/bench_loss_memory.py [--chunk_sizes 128,256,512] [--dtype bfloat16]

The target (issue 4) is chunked <= 1/10 of plain. Arguments and outputs (the two [V, H]
unembeddings in, the [V, H] gradient out) are the same for both forms and set a floor on the
total ratio, so the ratio of temporaries (the loss's own working memory) is printed too.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from oel_jax import losses

GIB = 1024**3


def _logits(hidden, unembed):
  return jnp.einsum("bth,vh->btv", hidden, unembed, preferred_element_type=jnp.float32)


def _analyse(fn, args):
  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
  seconds = time.perf_counter() - start
  ma = compiled.memory_analysis()
  parts = {
      "temp": ma.temp_size_in_bytes,
      "argument": ma.argument_size_in_bytes,
      "output": ma.output_size_in_bytes,
  }
  parts["total"] = sum(parts.values())
  parts["alias"] = ma.alias_size_in_bytes
  return parts, seconds


def _fmt(parts):
  return ", ".join(f"{name} {parts[name] / GIB:7.3f} GiB"
                   for name in ("temp", "argument", "output", "total"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, default=151_936)
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--k", type=int, default=256)
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--chunk_sizes", default="128,256,512",
                      help="token chunk sizes of the chunked form, comma-separated")
  parser.add_argument("--vocab_chunk_size", type=int, default=8192,
                      help="vocabulary tile of the chunked form's backward pass")
  a = parser.parse_args()

  dtype = jnp.dtype(a.dtype)
  hidden = jax.ShapeDtypeStruct((a.batch, a.seq, a.hidden), dtype)
  unembed = jax.ShapeDtypeStruct((a.vocab, a.hidden), dtype)
  args = (hidden, unembed, hidden, unembed)
  mask = jnp.ones((a.batch, a.seq), jnp.float32)
  kw = dict(k=a.k, temperature=a.temperature)

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; V={a.vocab} H={a.hidden} "
        f"T={a.seq} B={a.batch} k={a.k} dtype={a.dtype}; value and gradient w.r.t. "
        f"student hidden + unembedding; compile-only memory_analysis()")
  print(f"one [B, T, V] float32 logits buffer: {a.batch * a.seq * a.vocab * 4 / GIB:.3f} GiB")

  def plain(hs, ws, ht, wt):
    return losses.topk_reverse_kl(_logits(hs, ws), _logits(ht, wt), mask, **kw)

  plain_parts, secs = _analyse(plain, args)
  print(f"chunked forms: token chunk C, vocabulary tile {a.vocab_chunk_size} (backward)")
  print(f"plain          : {_fmt(plain_parts)}  (compiled in {secs:.1f}s)")

  for chunk in (int(c) for c in a.chunk_sizes.split(",")):

    def chunked(hs, ws, ht, wt, chunk=chunk):
      return losses.topk_reverse_kl_from_hidden(hs, ws, ht, wt, mask, chunk_size=chunk,
                                                vocab_chunk_size=a.vocab_chunk_size, **kw)

    parts, secs = _analyse(chunked, args)
    print(f"chunked C={chunk:<5d}: {_fmt(parts)}  (compiled in {secs:.1f}s)")
    print(f"  ratio chunked/plain: total {parts['total'] / plain_parts['total']:.3f} "
          f"(1/{plain_parts['total'] / parts['total']:.1f}), temp "
          f"{parts['temp'] / plain_parts['temp']:.4f} "
          f"(1/{plain_parts['temp'] / max(parts['temp'], 1):.1f})")


if __name__ == "__main__":
  main()
