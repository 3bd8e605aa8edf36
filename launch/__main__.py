"""clm_jax command line: `python -m launch COMMAND [--config=...] [--flags]`.

Commands:
  train   Train (or resume) the config into --workdir.

Examples:
  python -m launch train
  python -m launch train --config=configs/bench_tiny.py --config.train.steps=20 \\
      --workdir=runs/bench
"""

import logging as std_logging
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / 'configs'
COMMANDS = ('train',)

config_flags.DEFINE_config_file(
  'config',
  str(_CONFIGS / 'default.py'),
  'Config file (a get_config() module).',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; default runs/<config file name>.')


def _workdir() -> pathlib.Path:
  if _WORKDIR.value:
    return pathlib.Path(_WORKDIR.value)
  return pathlib.Path('runs') / pathlib.Path(flags.FLAGS['config'].config_filename).stem


class _QuietLibraries(std_logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the training log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(
      f'usage: python -m launch {{{"|".join(COMMANDS)}}} [flags]; got {argv[1:]}'
    )
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so that `--help` and usage errors need no JAX start-up.
  from clm_jax import config as config_lib
  from clm_jax import loop

  try:
    loop.run(flags.FLAGS.config, _workdir())
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
