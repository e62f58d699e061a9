"""Stage 5 of a round: the round's model in the serving dtype.

With ``config.export.dtype`` set (and not the training dtype), ``model/`` is written again in
it at ``export/``; otherwise ``model/`` is the export and nothing is copied.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax.numpy as jnp

from oel_jax.atomic_write import replace_folder
from oel_jax.config import RunConfig
from oel_jax.model_pool import ModelPool
from oel_jax.models import save_hf
from oel_jax.workdir import Workdir


def run(round_: int, config: RunConfig, workdir: Workdir, pool: ModelPool) -> dict[str, Any]:
  """Exports the round's model in the serving dtype (or records ``model/`` as the export).

  Returns:
    The stage's done-file record.
  """
  workdir.require(round_, "consolidate")
  start = time.perf_counter()
  model_dir = workdir.model_dir(round_)
  dtype = config.export.dtype
  if dtype and dtype != config.param_dtype:
    out = replace_folder(
        os.path.join(workdir.round_dir(round_), "export"),
        lambda tmp: save_hf(pool.load(model_dir), tmp, dtype=getattr(jnp, dtype),
                            tokenizer=pool.tokenizer()))
  else:
    out, dtype = model_dir, config.param_dtype
  files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
  return workdir.finish(round_, "export", start, {"dtype": dtype, "files": files,
                                                  "bytes": size}, {"export": out})
