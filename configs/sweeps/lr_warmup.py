"""Peak learning rate x warmup length on the default config: 4 trials of 200 steps.

Run (a few minutes per trial on a 2-core CPU); running it again resumes:

  python -m launch sweep --config=configs/sweeps/lr_warmup.py   # -> runs/sweeps/lr_warmup

Each trial trains into runs/sweeps/lr_warmup/<trial>/ (e.g. `000-peak_lr=0.001,warmup_steps=10`);
summary.md, summary.csv and loss_curves.png there compare them.
"""


def get_sweep():
  return {
    'base': 'configs/default.py',
    'overrides': {'train.steps': 200, 'checkpoint.every': 50},
    'grid': {
      'optim.peak_lr': [1e-3, 3e-3],
      'optim.warmup_steps': [10, 30],
    },
  }
