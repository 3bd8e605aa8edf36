"""The benchmark model of benchmarks/train_bench.py: small, but with the real vocabulary."""

from clm_jax.config import schema


def get_config():
  c = schema.get_config()
  c.model.vocab_size = 32000
  c.model.d_model = 512
  c.model.num_layers = 4
  c.model.num_heads = 8
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 1408
  c.model.max_seq_len = 1024
  c.model.dtype = 'float32'
  c.model.remat = 'none'
  c.train.seq_len = 1024
  c.train.loss_chunk_len = 128
  c.train.global_batch_size = 8
  c.train.steps = 20
  c.train.log_every = 1
  c.optim.warmup_steps = 2
  return c
