"""CodeLlama-34B pre-training exactly as the original run (see shared DESIGN.md).

48 layers, d_model 8192, 64 query / 8 kv heads, SwiGLU 22016, RoPE theta 1e6;
8192-token packed rows, 4,096 rows per step as 16 micro-batches (33.5M tokens
per step): 500B tokens is 14,902 steps, on 128 A100s. The optimizer and
schedule (AdamW 0.9 / 0.95 / 1e-6, weight decay 0.1, clip 1.0, 2,000 warmup
steps to 3e-4, cosine to 10%), vocab 32000, RMSNorm eps 1e-5, fp32 master
weights, bf16 compute and full remat are schema.py's values, which are the
original run's.

The mesh is the original's: data 4 x tensor 8 x pipeline 4, 12 layers per
stage, GPipe over the 16 micro-batches (bubble 3/19). On 16 nodes of 8 GPUs
`sharding.make_mesh` puts each tensor group on one node, a data replica's 4
stages on 4 consecutive nodes and the 4 replicas on different nodes (`launch
plan` prints which axes cross nodes). GPipe holds every micro-batch's stage
inputs: at 64 local rows of 8192 tokens per micro-batch that is far beyond
80 GB, so a run on real GPUs needs finer micro-batches (e.g.
train.microbatches=1024 with mesh.pipeline_microbatches=32) or a 1F1B
schedule; `launch plan` is where that is worked out.

Data: the output of `python -m launch data prepare` at data/codellama (see
the README), mixed as the paper's Table 1 gives it: 85% code, 8% natural
language about code and 7% natural language, the last two both 'text' here.
The paper does not publish the split between the five languages; equal
shares are this config's assumption. CodeLlama-34B was trained without
infilling, so fim_rate is 0.
"""

from clm_jax.config import schema


def get_config():
  c = schema.get_config()
  c.model.d_model = 8192
  c.model.num_layers = 48
  c.model.num_heads = 64
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 22016
  c.model.rope_theta = 1e6
  c.model.max_seq_len = 16384
  c.mesh.data = 4
  c.mesh.tensor = 8
  c.mesh.pipeline = 4
  c.train.steps = 14_902  # ceil(500e9 / (4096 * 8192))
  c.train.seq_len = 8192
  c.train.global_batch_size = 4096
  c.train.microbatches = 16
  c.train.eval_every = 1000
  c.checkpoint.every = 250
  c.data.source = 'prepared'
  c.data.path = 'data/codellama'
  c.data.mixture = 'python:0.17,cpp:0.17,java:0.17,javascript:0.17,go:0.17,text:0.15'
  c.data.fim_rate = 0.0
  # The paper's figures: 500B tokens on 128 A100-80GB in about 6 weeks, stated as
  # 1.2M GPU-hours (which 128 GPUs x 6 weeks, 129k, does not match).
  c.plan.device_type = 'a100-80gb'
  c.plan.devices = 128
  c.plan.tokens = 500e9
  c.plan.target_days = 42.0
  c.plan.claimed_gpu_hours = 1.2e6
  c.data.workers = 4  # Per host: tokens/s needed per host is ~9k, far below one worker.
  return c
