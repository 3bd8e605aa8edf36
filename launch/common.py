"""What every command shares: --config, --workdir, --output, and small helpers."""

import logging as std_logging
import pathlib

from absl import app
from absl import flags
from ml_collections import config_flags

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'default.py'

# No default here: config_flags would load it, and apply --config.KEY overrides, at import,
# before arguments.parse can name a typo'd key; it passes --config=DEFAULT_CONFIG instead.
config_flags.DEFINE_config_file(
  'config',
  None,
  'Config file (a get_config() module); default configs/default.py.',
  lock_config=True,
)
WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; default runs/<config file name>.')
OUTPUT = flags.DEFINE_string(
  'output', None, 'What a command writes: a tokenizer, a prepared or converted directory, ...'
)


def workdir() -> pathlib.Path:
  if WORKDIR.value:
    return pathlib.Path(WORKDIR.value)
  return pathlib.Path('runs') / pathlib.Path(flags.FLAGS['config'].config_filename).stem


class QuietLibraries(std_logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the training log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def need(*names):
  missing = [f'--{name}' for name in names if not flags.FLAGS[name].value]
  if missing:
    raise app.UsageError(f'{" and ".join(missing)} required.')


def without(args: list[str], names) -> list[str]:
  """`args` less the flags `names`, in either --name=value or --name value form."""
  out, skip_value = [], False
  for arg in args:
    name = arg.lstrip('-').split('=', 1)[0]
    if skip_value:
      skip_value = False
    elif arg.startswith('-') and name in names:
      # Booleans (--nofoo, --foo) never take a separate value; these flags all do.
      skip_value = '=' not in arg
    else:
      out.append(arg)
  return out
