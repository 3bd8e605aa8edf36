"""clm_jax: training CodeLlama-class code language models in JAX/Flax."""

__version__ = '0.1.0'
