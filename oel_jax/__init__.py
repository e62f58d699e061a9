"""oel_jax: Online Experiential Learning for language models, in JAX."""

__version__ = "0.1.0"
