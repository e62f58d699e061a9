"""The models of a run, loaded once, and the samplers that play and extract with them.

    pool = ModelPool(config, mesh_shape)          # nothing is loaded yet
    pool.check_files()                            # all processes: the same checkpoint files?
    model = pool.load(path)                       # "tiny" or a Hugging Face checkpoint
    sampler = pool.sampler(path)                  # that model's weights are in it now
    trainer = pool.trainer(model, train_config)   # the consolidation step, compiled once

A stage names the weights it wants by path: the deployed model of a round (the config's
model, or the previous round's ``model/``), an extractor checkpoint, a model to export. The
config's own names may be hub ids: the pool reads them from the directories the plan resolved
them to (`local`), so the config and the done-files keep what the user wrote. On several
processes, when `check_files` is first called (at the latest, when the first of them is read),
the processes check that they hold the same files for each (`oel_jax.hub.check_same_files`):
each host may have resolved a hub id into its own cache, or a directory path may name different
copies on different hosts.
`sampler` returns the one sampler of that architecture with those weights synced in on every
call, so the compiled programs are reused across rounds and roles and no record of what a
sampler holds has to be kept right: whoever asks for a sampler gets the weights they named,
whatever used it last (consolidation lends it the student's weights while it trains). A sync
puts each array on the sampler's sharding, a no-op for arrays already there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oel_jax import chat, hub, parallel, tiny
from oel_jax.config import RunConfig
from oel_jax.models import load_hf
from oel_jax.sampling import Sampler
from oel_jax.train import TrainConfig, Trainer


class ModelPool:
  """Owns a run's tokenizer, mesh, models, samplers and trainer (see the module docstring).

  Args:
    config: the run's settings (model, tokenizer, dtypes, sampler sizes).
    mesh_shape: mesh axis sizes, resolved against the devices (`oel_jax.loop.Plan`).
    model_dirs: the checkpoint directory of each model name the config holds
      (`oel_jax.loop.Plan.model_dirs`: hub ids to their cache snapshots); other names are paths.
  """

  def __init__(self, config: RunConfig, mesh_shape: dict[str, int],
               model_dirs: Mapping[str, str] | None = None):
    self.config = config
    self.mesh_shape = dict(mesh_shape)
    self.model_dirs = dict(model_dirs or {})
    self._model: tuple[str, Any] | None = None
    self._tokenizer: Any = None
    self._samplers: dict[Any, Sampler] = {}
    self._trainer: Trainer | None = None
    self._mesh: Any = None
    self._files_checked = False

  def tokenizer(self, path: str | None = None) -> Any:
    """The run's tokenizer (the model's own, or the tiny one); with ``path``, that
    checkpoint's own tokenizer (an extractor of another family)."""
    if path is not None:
      return chat.load_tokenizer(self.local(path))
    if self._tokenizer is None:
      name = self.config.tokenizer or self.config.model
      self._tokenizer = tiny.load_tiny_tokenizer() if name == "tiny" else \
          chat.load_tokenizer(self.local(name))
    return self._tokenizer

  def local(self, path: str) -> str:
    """Where the model named ``path`` lies: a hub id of the config maps to the snapshot the plan
    resolved it to; any other name is already a path (or "tiny").

    Asked for a model the config names, it first runs `check_files` (every process asks at
    the same point of the same control flow).

    Raises:
      oel_jax.hub.DifferentFilesError: the processes hold different files for one of them.
    """
    if path in self.model_dirs:
      self.check_files()
    return self.model_dirs.get(path, path)

  def check_files(self) -> None:
    """Checks, the first time it is called, that every process of the job holds the same files
    for each model the config names (`oel_jax.hub.check_same_files`); later calls, and a run of
    one process, do nothing. A collective: every process calls it at the same point.

    Raises:
      oel_jax.hub.DifferentFilesError: on every process, naming the models whose files differ.
    """
    if not self._files_checked:
      self._files_checked = True
      hub.check_same_files(self._config_checkpoints())

  def _config_checkpoints(self) -> dict[str, str]:
    """What the config named, as users will recognise it, to the directory it was resolved
    to on this host."""
    fields: dict[str, list[str]] = {}
    for field, spec in (("model", self.config.model),
                        ("extraction.model", self.config.extraction.model)):
      if spec in self.model_dirs:
        fields.setdefault(spec, []).append(f"config.{field}")
    return {f"{' and '.join(names)} {spec!r}": self.model_dirs[spec]
            for spec, names in fields.items()}

  def mesh(self) -> jax.sharding.Mesh | None:
    """The device mesh (None on a single device)."""
    size = int(np.prod(list(self.mesh_shape.values())))
    if self._mesh is None and size > 1:
      self._mesh = parallel.make_mesh(parallel.MeshConfig(**self.mesh_shape),
                                      devices=jax.devices()[:size])
    return self._mesh

  def load(self, path: str) -> Any:
    """Loads ``"tiny"`` or a HF checkpoint; the last one loaded stays (real models are
    large), so asking for it again costs nothing."""
    path = self.local(path)
    if self._model is not None and self._model[0] == path:
      return self._model[1]
    param = getattr(jnp, self.config.param_dtype)
    compute = getattr(jnp, self.config.compute_dtype)
    self._model = None  # Let the previous model go before the next one is loaded.
    if path == "tiny":
      model = tiny.tiny_model(param_dtype=param, compute_dtype=compute)
      if self.mesh() is not None:
        parallel.shard_model(model, self.mesh())
    else:
      model = load_hf(path, dtype=param, compute_dtype=compute, mesh=self.mesh())
    self._model = (path, model)
    return model

  def sampler(self, path: str, tokenizer: Any = None) -> Sampler:
    """The sampler of ``path``'s architecture, holding ``path``'s weights from now on.

    Args:
      path: the model whose weights to sample from (see `load`).
      tokenizer: whose stop and pad tokens a new sampler uses (default: the run's).
    """
    model = self.load(path)
    sampler = self._samplers.get(model.config)
    if sampler is None:
      tok = tokenizer or self.tokenizer()
      stops = chat.stop_token_ids(tok)
      sampler = Sampler(model, eos_ids=stops,
                        pad_id=tok.pad_token_id if tok.pad_token_id is not None else stops[0],
                        max_seq_len=int(self.config.max_seq_len),
                        buckets_per_doubling=self.config.sampler_buckets_per_doubling,
                        mesh=self.mesh())
      self._samplers[model.config] = sampler
    else:
      sampler.update_weights(model)
    return sampler

  def trainer(self, model: Any, config: TrainConfig) -> Trainer:
    """The consolidation trainer, made for ``model``'s architecture on first use and reused
    (its compiled step with it) in later rounds."""
    if self._trainer is None:
      self._trainer = Trainer(model, config, mesh=self.mesh())
    return self._trainer
