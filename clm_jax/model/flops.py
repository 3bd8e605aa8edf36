"""Model FLOPs and device peaks, for MFU.

As Megatron-LM: 6 FLOPs per matmul parameter per token, plus attention's
products over half the T x T square (causal).
"""

import jax

from clm_jax import config as config_lib

# Dense bf16 tensor-core peaks in TFLOP/s, matched against device_kind.
PEAK_TFLOPS = {
  'a100': 312.0,
  'h100': 989.0,
  'h200': 989.0,
  'b200': 2250.0,
}


def matmul_params(cfg: config_lib.ModelConfig) -> int:
  """Parameters that take part in a matmul per token (not the embedding gather, not norms)."""
  D, F, H = cfg.d_model, cfg.mlp_dim, cfg.head_dim
  attn = D * H * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * D * F
  return cfg.num_layers * (attn + mlp) + D * cfg.vocab_size


def train_flops_per_token(cfg: config_lib.ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per trained token at sequence length `seq_len`."""
  dense = 6 * matmul_params(cfg)
  # QK^T and PV: 2 matmuls x 2 FLOPs x T x N*H forward, x3 with backward, /2 causal.
  attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  return float(dense + attention)


def peak_tflops(device: jax.Device, override: float = 0.0) -> float | None:
  """bf16 peak of `device` in TFLOP/s, or None where unknown (CPUs)."""
  if override:
    return override
  kind = device.device_kind.lower()
  for name, peak in PEAK_TFLOPS.items():
    if name in kind:
      return peak
  return None
