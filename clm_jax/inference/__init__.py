"""Generation with a KV cache, and the loaded-model object behind `clm_jax.load`."""
