"""btx_jax: Branch-Train-MiX mixture-of-experts language models in JAX/Flax NNX."""

__version__ = "0.1.0"
