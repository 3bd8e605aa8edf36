"""clm_jax: training CodeLlama-class code language models in JAX/Flax.

`clm_jax.load(path)` is the entry for notebooks and scripts:

  model = clm_jax.load('runs/default')       # or a HF Llama directory
  logits = model.logits([[1, 306, 4658]])    # [B, T, V] float32 NumPy

Importing the package is cheap: JAX and the model load on the first `load`.
"""

__version__ = '0.1.0'


def load(path, mesh=None, *, dtype: str | None = None):
  """`clm_jax.inference.loaded.load`: a `Model` from a HF dir, a run or a params-only checkpoint."""
  from clm_jax.inference import loaded  # Here, not above: importing clm_jax stays cheap.

  return loaded.load(path, mesh, dtype=dtype)
