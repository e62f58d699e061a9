"""This machine's measured speeds, printed beside every benchmark's results."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

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
  """Bytes per second of a 256 MiB array copy (bytes read; as many are written).

  Not a floor for decoding, which reads weights and writes almost nothing: a copy moves each
  byte twice (and its writes first read the destination's lines), so it runs at less than half
  the read bandwidth (`read_bandwidth`)."""
  x = np.ones(256 * 2 ** 20 // 4, np.float32)
  y = np.empty_like(x)
  return x.nbytes / best_time(lambda: np.copyto(y, x))


def read_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
  """Bytes per second read by a streaming float32 sum over a `mib` MiB array, best of `repeats`.

  The array (default 1 GiB) is larger than the last-level cache (480 MiB on the project's
  Xeon), so the sum reads memory. Three readers, the fastest counts: NumPy's sum on one
  thread, NumPy's sum over one slice per core in a thread pool (NumPy releases the GIL in
  reductions), and a jitted `jnp.sum`. One thread alone does not saturate memory (about half
  the multi-threaded rate on the 2-core Xeon), and a decode step's matmuls use every core.
  """
  x = np.ones(mib * 2 ** 20 // 4, np.float32)
  parts = np.array_split(x, os.cpu_count() or 1)
  with ThreadPoolExecutor(len(parts)) as pool:
    threaded = best_time(lambda: list(pool.map(np.sum, parts)), repeats)
  single = best_time(x.sum, repeats)
  xj = jnp.asarray(x)
  total = jax.jit(jnp.sum)
  total(xj).block_until_ready()
  jitted = best_time(lambda: total(xj).block_until_ready(), repeats)
  return x.nbytes / min(threaded, single, jitted)
