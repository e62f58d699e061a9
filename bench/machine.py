"""This machine's measured speeds, printed beside every benchmark's results."""

import time

import jax
import jax.numpy as jnp
import numpy as np


def best_time(fn, repeats: int = 5) -> float:
  """Fastest of `repeats` calls, in seconds."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_rate(n: int = 2048) -> float:
  """Achieved bf16 matmul FLOP/s with float32 accumulation (n^3)."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  return 2 * n ** 3 / best_time(lambda: f(a, a).block_until_ready())


def copy_bandwidth() -> float:
  """Bytes per second of a 256 MiB array copy (bytes read)."""
  x = np.ones(256 * 2 ** 20 // 4, np.float32)
  y = np.empty_like(x)
  return x.nbytes / best_time(lambda: np.copyto(y, x))
