"""The default run: a tiny CodeLlama-architecture model on the Python standard library.

Trains in a few minutes on a 2-core CPU; `python -m launch train` runs it.
"""

from clm_jax.config import schema


def get_config():
  c = schema.get_config()
  c.model.vocab_size = 4096
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 704
  c.model.rope_theta = 10000.0
  c.model.max_seq_len = 1024
  c.model.dtype = 'float32'  # CPUs have no fast bf16 matmul.
  c.model.remat = 'none'
  c.train.steps = 400
  c.train.seq_len = 256
  c.train.loss_chunk_len = 128
  c.train.global_batch_size = 16
  c.train.log_every = 25
  c.train.eval_batches = 8
  c.optim.peak_lr = 3e-3
  c.optim.warmup_steps = 30
  c.checkpoint.every = 100
  c.data.tokenizer_sample_mb = 8
  return c
