"""Typed, frozen views of config sections, built once the config is validated."""

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The validated, frozen model hyper-parameters (built from `config.model`)."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  max_seq_len: int = 4096
  init_std: float = 0.02
  param_dtype: str = 'float32'
  dtype: str = 'bfloat16'
  remat: str = 'full'
  attention: str = 'xla'
  max_segments: int = 64

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_config(cls, c_model: ml_collections.ConfigDict) -> 'ModelConfig':
    # A config saved before a field with a default existed (an older run's
    # config.json) ran with that default.
    fields = [
      f for f in dataclasses.fields(cls) if f.name in c_model or f.default is dataclasses.MISSING
    ]
    return cls(**{f.name: c_model[f.name] for f in fields})
