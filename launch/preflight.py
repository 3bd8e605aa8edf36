"""What a command would trip over late, checked before it starts (and before JAX does).

`train` meets a --workdir under a regular file only once JAX is up, a `checkpoints`
file only in Orbax's background thread after training (a logged traceback, the run
unsaved), and a junk or too-large tokenizer once the run is set up; `data prepare`
meets an --output file after reading its tokenizer. Each is one line here instead.
"""

import pathlib

from absl import app
from absl import flags

from clm_jax import config as config_lib
from launch import common

# What each command writes: flag -> 'dir' or 'file'. An unset flag is not checked;
# train's --workdir has a default (common.workdir()).
_WRITES = {
  'train': {'workdir': 'dir'},
  'tokenizer train': {'output': 'file'},
  'data prepare': {'output': 'dir'},
  'convert': {'output': 'dir', 'to_hf': 'dir'},
  'eval': {'output': 'dir'},
  'slurm': {'output': 'file'},
  'sweep': {'workdir': 'dir'},
}
# Directories a run makes in its workdir (clm_jax/ckpt/checkpoint.py, train/metrics.py).
_RUN_DIRS = {'checkpoints': 'its checkpoints', 'tb': 'its TensorBoard events'}


def check(command: str) -> None:
  """Raises app.UsageError naming the flag, key or file; needs no JAX."""
  if flags.FLAGS.spawn and command != 'train':
    raise app.UsageError('--spawn runs `train` only.')
  for name, kind in _WRITES.get(command, {}).items():
    value = flags.FLAGS[name].value
    if command == 'train' and name == 'workdir':
      value = common.workdir()
    if not value:
      continue
    path = pathlib.Path(value).expanduser()
    if kind == 'file':
      if path.is_dir():
        raise app.UsageError(f'--{name}={value}: is a directory; it names a file to write')
      path = path.parent
    _need_directory(path, f'--{name}={value}')
  if command == 'train':
    _check_run(flags.FLAGS.config, common.workdir())
  if command == 'data prepare' and flags.FLAGS.tokenizer:
    from clm_jax.data import tokenizer

    _load_tokenizer('--tokenizer', tokenizer.load, flags.FLAGS.tokenizer)


def _need_directory(path: pathlib.Path, what: str) -> None:
  """`path` is a directory, or can be made one: its nearest existing ancestor is one."""
  for p in (path, *path.parents):
    if p.exists():
      if not p.is_dir():
        raise app.UsageError(f'{what}: {p} is not a directory')
      return


def _check_run(c, workdir: pathlib.Path) -> None:
  from clm_jax.data import tokenizer

  for name, what in _RUN_DIRS.items():
    path = workdir / name
    if path.exists() and not path.is_dir():
      raise app.UsageError(
        f'--workdir={workdir}: {path} is not a directory; the run keeps {what} there'
      )
  try:
    config_lib.check_schema(c)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  # A tokenizer given (or prepared data's) only loads here; one trained for the run
  # is the loop's, after the config's full validation.
  if c.data.tokenizer or (c.data.source == 'prepared' and c.data.path):
    key = 'data.tokenizer' if c.data.tokenizer else 'data.path'
    _load_tokenizer(key, tokenizer.for_corpus, c.data, c.model.vocab_size)


def _load_tokenizer(key: str, load, *args) -> None:
  """Runs `load`; no file, not a sentencepiece model or too many pieces is one line."""
  try:
    load(*args)
  except (FileNotFoundError, ValueError) as e:
    message = ' '.join(str(e).split())
    raise app.UsageError(message if message.startswith(key) else f'{key}: {message}') from None
