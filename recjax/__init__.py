"""recjax: conventional recommenders and LLMs trained together, in JAX/Flax."""

__version__ = "0.1.0"
