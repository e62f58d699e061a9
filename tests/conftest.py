"""Test-session setup shared by every test module.

Eight simulated CPU devices let the sharding tests build real meshes; the flag must be
set before JAX initialises its backend, so it lives here, ahead of any test import.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
