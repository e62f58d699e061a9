"""Compiles the consolidation train step of a tiny model on several 8-device meshes.

    python tests/compile_train_step.py 1,4,2 2,2,2 1,8,1     # data,fsdp,tp per mesh

Run as its own process by tests/test_sharding.py, which reads what XLA's SPMD partitioner
logs to stderr while compiling. Before each compile a line ``=== <what>`` goes to stderr, so
every warning can be put down to the program compiled after it. The first program is a
known offender (an embedding lookup whose rows XLA cannot move from hidden-split to
batch-split without replicating them), so a run that logs nothing proves the logging works.

Nothing is executed: the step is lowered for abstract inputs and compiled. The persistent
compilation cache is off, so that every program really is compiled (and warns) here.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # warnings on (a caller's setting could hide them)
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from oel_jax import parallel  # noqa: E402
from oel_jax.models import Qwen3Config, init_model  # noqa: E402
from oel_jax.train import TrainConfig, Trainer, make_batch  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)

CONFIG = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=16)
TRAIN = TrainConfig(learning_rate=1e-3, k=16)


def mark(what: str):
  print(f"=== {what}", file=sys.stderr, flush=True)


def abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def compile_known_offender(mesh):
  """A lookup into a `[V, H]` table split (tp, fsdp), its rows then pinned to the batch."""
  table = jax.ShapeDtypeStruct((64, 64), jnp.float32,
                               sharding=NamedSharding(mesh, P("tp", "fsdp")))
  ids = jax.ShapeDtypeStruct((8, 16), jnp.int32,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  lookup = lambda t, i: jax.lax.with_sharding_constraint(jnp.take(t, i, axis=0),
                                                         P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    jax.jit(lookup).lower(table, ids).compile()


def compile_step(mesh):
  student = init_model(CONFIG, seed=0)
  trainer = Trainer(student, TRAIN, mesh=mesh)
  rows = [[1, 2, 3]] * 8
  batch = make_batch(rows, [[4, 5] + r for r in rows], [[6, 7]] * 8, pad_id=0,
                     student_len=16, teacher_len=24, response_len=8)
  state = jax.eval_shape(lambda: trainer.init_state(student))
  trainer.lower(abstract(state, trainer.state_sharding),
                abstract(state.params, trainer.param_sharding),
                jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                            sharding=trainer.batch_sharding),
                             batch)).compile()


def main(meshes):
  meshes = [parallel.make_mesh(parallel.MeshConfig(*map(int, m.split(",")))) for m in meshes]
  mark("known offender")
  compile_known_offender(parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tp=2)))
  for mesh in meshes:
    mark(f"train step data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} "
         f"tp={mesh.shape['tp']}")
    compile_step(mesh)
  mark("end")


if __name__ == "__main__":
  main(sys.argv[1:])
