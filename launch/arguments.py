"""The command line, checked before any command runs: each bad input is one line.

absl parses the flags, and ml_collections' config_flags loads --config and applies its
--config.KEY=VALUE overrides. Left alone, a typo'd key or a broken config file is a
traceback, and every command accepts every other command's flags (absl keeps them in
one namespace). `parse` names the key, file or flag instead; `--help` after a command
lists that command's flags.
"""

import pathlib
import re
import sys
import textwrap
import traceback

import ml_collections
from absl import app
from absl import flags

from clm_jax import config as config_lib
from launch import common

# --config.KEY=VALUE, and --noconfig.KEY for a boolean key: config_flags' forms.
_OVERRIDE = re.compile(r'--?(?:no)?config\.([^=]*)')
_CONFIG = re.compile(r'--?config(?:=|$)')
_HELP = ('-h', '-?', '-help', '--help', '-helpshort', '--helpshort')
# The modules of absl's own flags (logging, debugging), which work with every command.
_ABSL = 'absl.'
_BASICS = '--verbosity, --logtostderr, --alsologtostderr, --log_dir, --flagfile'


def parse(argv: list[str], takes: dict[str, tuple], doc: str) -> list[str]:
  """absl's parsing of `argv`; returns [program, *command words].

  Args:
    argv: The command line, `sys.argv` as absl passes it.
    takes: Each command's flags beyond launch.common's: modules (each flag they
      define, now or later) and single flag names.
    doc: The usage text; `--help` shows it, or one command's lines of it.

  Raises:
    app.UsageError: A bad flag, config key or config file; the message names it.
  """
  program, *args = argv
  args = flags.FLAGS.read_flags_from_files(args, force_gnu=False)
  wants_help = any(arg in _HELP for arg in args)
  args = [arg for arg in args if arg not in _HELP]
  if errors := config_lib.unknown_keys(m[1] for a in args if (m := _OVERRIDE.match(a))):
    raise app.UsageError('; '.join(f'--config.{error}' for error in errors))
  if not any(_CONFIG.match(arg) for arg in args):
    args.insert(0, f'--config={common.DEFAULT_CONFIG}')
  config_arg = _config_arg(args)
  rest = _absl_parse([program, *args], config_arg)
  config = flags.FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):
    raise app.UsageError(
      f'--config={config_arg}: get_config() returned {type(config).__name__}, '
      'not an ml_collections.ConfigDict'
    )
  command = ' '.join(rest[1:])
  if wants_help:
    print(help_text(command, takes, doc))
    sys.exit(0)
  if command not in takes:
    got = f'unknown command {command!r}' if command else 'no command'
    raise app.UsageError(
      f'{got}; the commands are {", ".join(takes)} (`python -m launch --help` says more)'
    )
  _check_flags(command, takes)
  return rest


def _config_arg(args: list[str]) -> str:
  """The --config value (the last one, as absl takes it), once its file is known to exist."""
  value = ''
  for i, arg in enumerate(args):
    if _CONFIG.match(arg):
      value = arg.partition('=')[2] if '=' in arg else ''.join(args[i + 1 : i + 2])
  if not value:
    raise app.UsageError('--config: no file given; it names a get_config() module')
  # config_flags passes what follows a ':' to get_config.
  path = pathlib.Path(value.partition(':')[0]).expanduser()
  if not path.is_file():
    what = 'a directory' if path.is_dir() else 'no such file'
    raise app.UsageError(f'--config={value}: {what}; it names a get_config() module')
  return value


def _absl_parse(argv: list[str], config_arg: str) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if not str(e).startswith(f'flag --config={config_arg}:'):
      raise app.UsageError(_one_line(e)) from None
    raise app.UsageError(_config_error(e, config_arg)) from None
  except Exception as e:
    # absl's own parsers raise flags.Error only: this came from running the config
    # file (config_flags lets a NameError, a SyntaxError, ... out as they are).
    raise app.UsageError(_config_error(e, config_arg)) from None


def _config_error(e: BaseException, config_arg: str) -> str:
  """What went wrong in the config file: the first error raised, at its line there."""
  while e.__cause__ or e.__context__:
    e = e.__cause__ or e.__context__
  path = pathlib.Path(config_arg.partition(':')[0]).expanduser().resolve()
  lines = [
    frame.lineno
    for frame in traceback.extract_tb(e.__traceback__)
    if pathlib.Path(frame.filename).resolve() == path
  ]
  where = f' (line {lines[-1]})' if lines else ''
  return f'--config={config_arg}{where}: {type(e).__name__}: {_one_line(e)}'


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split())


def _own(command: str, takes: dict[str, tuple]) -> set:
  """The flags `command` takes beyond every command's, as absl's Flag objects."""
  by_module = flags.FLAGS.flags_by_module_dict()
  own = set()
  for item in takes[command]:
    own |= {flags.FLAGS[item]} if isinstance(item, str) else set(by_module.get(item.__name__, ()))
  return own


def _shared() -> set:
  """launch.common's flags and absl's own (logging, debugging): every command takes them."""
  return {
    f
    for module, defined in flags.FLAGS.flags_by_module_dict().items()
    if module == common.__name__ or module.startswith(_ABSL)
    for f in defined
  }


def _check_flags(command: str, takes: dict[str, tuple]) -> None:
  given = {flags.FLAGS[name] for name in flags.FLAGS if flags.FLAGS[name].present}
  stray = given - _own(command, takes) - _shared()
  # config_flags defines a --config.KEY flag as it meets one (a known key by then).
  stray = sorted(f.name for f in stray if not f.name.startswith('config.'))
  if not stray:
    return
  takers = [
    f'--{name} ({", ".join(c for c in takes if flags.FLAGS[name] in _own(c, takes))} do)'
    for name in stray
  ]
  raise app.UsageError(
    f'{command} does not take {", ".join(takers)}; '
    f'`python -m launch {command} --help` lists its flags'
  )


def help_text(command: str, takes: dict[str, tuple], doc: str) -> str:
  """`doc`'s entry for `command` and the flags it takes; all of `doc` for no command."""
  if command in takes:
    head = f'usage: python -m launch {command} [flags]\n\n{_summary(doc, command)}'
    own = sorted(_own(command, takes), key=lambda f: f.name)
  else:
    head, own = doc.rstrip(), []
  shared = flags.FLAGS.flags_by_module_dict()[common.__name__]
  out = [head, '']
  if own:
    out += [f'{command} flags:', *map(_describe, own), '']
  out += [
    'every command:',
    *map(_describe, sorted(shared, key=lambda f: f.name)),
    '  --config.SECTION.KEY=VALUE: set one key of the config (clm_jax/config/schema.py '
    'lists them).',
    f'  absl: {_BASICS};',
    '      --helpfull lists every flag of every command.',
  ]
  return '\n'.join(out)


def _summary(doc: str, command: str) -> str:
  """The command's entry in the docstring's list: its line and the indented ones after."""
  lines = doc.splitlines()
  for i, line in enumerate(lines):
    if re.match(rf'  {re.escape(command)}\s\s', line):
      end = i + 1
      while end < len(lines) and lines[end].startswith(' ' * 4):
        end += 1
      return '\n'.join(lines[i:end])
  return ''


def _describe(flag) -> str:
  # absl's renderer of a flag list is private; this is its format on one wrapped entry.
  name = f'--[no]{flag.name}' if flag.boolean else f'--{flag.name}'
  default = '' if flag.default is None else f' (default: {flag.default_as_str})'
  return textwrap.fill(
    f'{name}: {flag.help}{default}', 100, initial_indent='  ', subsequent_indent='      '
  )
