"""The stages of an OEL round, one module each (arXiv:2603.16856 section 3):

    collect.py      the deployed model plays the round's extraction and consolidation games
    extract.py      knowledge extracted from the extraction games (K accumulation runs)
    consolidate.py  the knowledge distilled into the deployed model's weights -> ``model/``
    evaluate.py     pass rate (and in-context, IF-Eval) on the held-out maps
    export.py       ``model/`` in the serving dtype

Each module's ``run(round_, config, workdir, pool)`` reads what earlier stages wrote in the
`oel_jax.workdir.Workdir`, takes its models from the `oel_jax.model_pool.ModelPool`, writes its
files and ends with `Workdir.finish` (its done-file), returning that record. `RUNNERS` maps a
stage's name to it; `oel_jax.loop.OnlineLoop` decides which to run.

A new stage is a module here with such a ``run``, an entry in `RUNNERS` and its name in
`oel_jax.workdir.STAGES` (the order the loop runs them in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from oel_jax.stages import collect, consolidate, evaluate, export, extract

Runner = Callable[..., dict[str, Any]]
"""``run(round_, config, workdir, pool) -> done-file record``."""

RUNNERS: dict[str, Runner] = {
    "collect": collect.run,
    "extract": extract.run,
    "consolidate": consolidate.run,
    "evaluate": evaluate.run,
    "export": export.run,
}
"""Each stage's runner, by name."""
