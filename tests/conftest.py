"""Test-session setup shared by every test module.

Eight simulated CPU devices let the sharding tests build real meshes; the flag must be
set before JAX initialises its backend, so it lives here, ahead of any test import.

One XLA compilation cache per test session, in a fresh temporary folder, is shared by the
test process and every process it starts (the main job's runs, notebook kernels): much of the
suite's time is XLA compiling programs that an earlier process already compiled, such as the
tiny loop's sampler and train step in each restart of the killed run (tests/test_loop.py) and
in the CLI runs of tests/test_main.py. A hit needs the same program, compile options and
devices, so it returns what compiling would; and as the folder starts empty, every program is
still compiled at least once in each session.

The suite runs on every core the machine has, up to four (pytest-xdist, ``-n auto
--maxprocesses 4`` in pyproject.toml), one test file per worker (``--dist loadfile``), so that
a module's fixtures and compiled programs are made once; ``-n 0`` runs in one process.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# pytest-xdist's workers (PYTEST_XDIST_WORKER) share the cache their controller made, which
# started them after it had read this file; the controller alone removes it.
_xla_cache = os.environ.get("OEL_JAX_TESTS_XLA_CACHE") if "PYTEST_XDIST_WORKER" in os.environ \
    else None
if not _xla_cache:
  _xla_cache = tempfile.mkdtemp(prefix="oel_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
  os.environ["OEL_JAX_TESTS_XLA_CACHE"] = _xla_cache
# Set, not defaulted: a cache left by an earlier session or another checkout is never read.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
# JAX caches only programs that took a second or more to compile; on a loaded 2-core machine
# the many small ones that each run compiles again add up too.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
