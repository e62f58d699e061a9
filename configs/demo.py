"""The learning demo, the main job's default: the loop on lake Ossa with the demo model.

The settings live in the package, ``oel_jax/demo/config.py`` (so that a pip install without
this folder runs the demo too); this file is the usual way to name them:

    python -m oel_jax.main --config=configs/demo.py --workdir=runs/demo
"""

from oel_jax.demo.config import get_config  # noqa: F401  pylint: disable=unused-import
