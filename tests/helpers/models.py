"""A tiny model config shared by the model-level tests (fp32, two layers, GQA)."""

from clm_jax import config as config_lib


def tiny_model_config(**overrides) -> config_lib.ModelConfig:
  kw = dict(
    vocab_size=97,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=48,
    max_seq_len=64,
    dtype='float32',
    remat='none',
    rope_theta=500.0,
  )
  return config_lib.ModelConfig(**{**kw, **overrides})
