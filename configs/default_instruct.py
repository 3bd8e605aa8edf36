"""Instruction tuning of the default run on the shipped instruction set (CPU, minutes).

Starts from runs/default (train configs/default.py first), reads the chat /
prompt-completion records in data/instruct (heldout.jsonl held out), and
trains only on the answers, at a fine-tuning learning rate. A second round
would set train.init_from to this run's workdir.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.train.init_from = 'runs/default'
  c.train.steps = 100
  c.train.log_every = 10
  c.train.eval_batches = 2
  c.optim.peak_lr = 1e-3
  c.optim.warmup_steps = 10
  c.data.source = 'instruct'
  c.data.path = 'data/instruct'
  c.checkpoint.every = 50
  return c
