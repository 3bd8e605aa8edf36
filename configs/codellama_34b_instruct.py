"""Instruction tuning of CodeLlama-34B: one round, started from pre-trained params.

The model, mesh, precision and checkpointing are codellama_34b.py's. What
changes is the data, the start and the schedule:

- data: chat or prompt / completion JSONL at data/codellama_instruct
  (`data.source='instruct'`; heldout*.jsonl files are held out), rendered in
  the LLaMA-2 / CodeLlama-Instruct chat format; the loss counts only the
  answers' tokens.
- start: `train.init_from`, the pre-training run's workdir (or a
  params-only checkpoint, or a Hugging Face CodeLlama directory); its
  tokenizer is used. A round's output is the next round's input: point the
  next round's init_from at this round's workdir.
- schedule: a fine-tuning learning rate, short warmup, fewer steps. The
  CodeLlama paper does not give every instruction-tuning hyper-parameter; the
  values below (2e-5 peak, 100 warmup steps, 64 x 8192 = 524,288 tokens per
  step, about 5B tokens) are this config's assumptions, as is the data path.
"""

from configs import codellama_34b


def get_config():
  c = codellama_34b.get_config()
  c.train.init_from = 'runs/codellama_34b'
  c.train.global_batch_size = 64
  c.train.microbatches = 4
  c.train.steps = 10_000
  c.train.eval_every = 500
  c.optim.peak_lr = 2e-5
  c.optim.warmup_steps = 100
  c.data.source = 'instruct'
  c.data.path = 'data/codellama_instruct'
  c.data.mixture = ''
  c.data.fim_rate = 0.0
  c.data.workers = 0
  c.checkpoint.every = 500
  return c
