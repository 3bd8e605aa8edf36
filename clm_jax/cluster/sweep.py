"""Hyper-parameter sweeps from a sweep file: one training run per trial, resumable.

`get_sweep()` returns `base` (relative to the working directory, else the
repository root), `overrides`, and either `grid` (the first key varies slowest;
a ConfigDict sorts its keys) or `trials`, and an optional `name`; see README.
Keys are dotted or nested. `load` checks every key and value against the base
config before anything runs.
"""

import collections.abc
import dataclasses
import difflib
import importlib.util
import itertools
import pathlib
import re
import sys

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[2]  # Holds launch/ and configs/.
FIELDS = ('base', 'overrides', 'grid', 'trials', 'name')
# What a `--config.KEY=VALUE` flag can carry.
SCALARS = (bool, int, float, str)


class SweepError(ValueError):
  """An invalid sweep file; the message names the file and the offending key."""


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of a sweep."""

  index: int
  name: str  # Its directory under the sweep's workdir.
  overrides: dict  # {dotted key: value}, on top of the sweep's shared overrides.


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A loaded, validated sweep file."""

  name: str
  path: pathlib.Path  # The sweep file.
  base: pathlib.Path  # The base config file, absolute.
  overrides: dict  # {dotted key: value} for every trial.
  trials: list[Trial]

  @property
  def keys(self) -> list[str]:
    """The keys the trials set, in first-seen order (the summary's columns)."""
    return list(dict.fromkeys(key for trial in self.trials for key in trial.overrides))


def _load_module(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _flatten(tree, prefix: str = '') -> dict:
  """{'optim.peak_lr': v} from {'optim.peak_lr': v} or {'optim': {'peak_lr': v}}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, collections.abc.Mapping | ml_collections.ConfigDict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def flag_value(value) -> str:
  """`value` as `--config.KEY=` text, which config_flags parses by the key's type."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return repr(value)  # Shortest exact form: 0.001, 1e-05.
  return str(value)


def trial_name(index: int, overrides: dict, width: int = 3) -> str:
  """'007-peak_lr=0.001,warmup_steps=10': the index, then each key's last part and value.

  Always a safe directory name (other characters become '_', cut at 100); the
  index keeps names unique.
  """
  short = [key.rsplit('.', 1)[-1] for key in overrides]
  parts = [
    f'{key if short.count(label) > 1 else label}={flag_value(value)}'
    for (key, value), label in zip(overrides.items(), short, strict=True)
  ]
  text = re.sub(r'[^A-Za-z0-9._=,+-]', '_', ','.join(parts) or 'base')[:100]
  return f'{index:0{width}d}-{text}'


def _resolve_base(base) -> pathlib.Path | None:
  path = pathlib.Path(base).expanduser()
  for candidate in (path,) if path.is_absolute() else (pathlib.Path.cwd() / path, ROOT / path):
    if candidate.is_file():
      return candidate.resolve()
  return None


def _check_overrides(config, base_name, overrides: dict, where: str, error) -> None:
  """Each key must be a leaf of `config` (from `base_name`), and each value fit its type."""
  leaves = _flatten(config)
  for key, value in overrides.items():
    if key not in leaves:
      close = difflib.get_close_matches(key, leaves, n=1)
      hint = f' (did you mean {close[0]}?)' if close else ''
      raise error(f'{where}: {key}: not a key of {base_name}{hint}')
    if not isinstance(value, SCALARS):
      raise error(f'{where}: {key}: {value!r} is not a number, string or bool')
    *path, leaf = key.split('.')
    node = config
    for part in path:
      node = node[part]
    try:  # A locked ConfigDict checks the type, as the --config flag will.
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise error(f'{where}: {key}={value!r}: {e}') from None


def load(sweep_path) -> Sweep:
  """Loads and validates a sweep file; a SweepError names the file and the key."""
  path = pathlib.Path(sweep_path)

  def error(message):
    return SweepError(f'{path}: {message}')

  if not path.is_file():
    raise error('no such sweep file')
  module = _load_module(path, f'sweep_{path.stem}')
  if not hasattr(module, 'get_sweep'):
    raise error('defines no get_sweep()')
  spec = module.get_sweep()
  if isinstance(spec, ml_collections.ConfigDict):
    spec = spec.to_dict()
  if not isinstance(spec, collections.abc.Mapping):
    raise error(f'get_sweep() returned {type(spec).__name__}, not a dict')
  unknown = sorted(set(spec) - set(FIELDS))
  if unknown:
    raise error(f'unknown field(s) {unknown}; a sweep has {", ".join(FIELDS)}')
  if not isinstance(spec.get('base'), str | pathlib.Path):
    raise error('base: missing; name the train config file, e.g. configs/default.py')
  base = _resolve_base(spec['base'])
  if base is None:
    raise error(f'base: {spec["base"]} not found (in {pathlib.Path.cwd()} or {ROOT})')
  if ('grid' in spec) == ('trials' in spec):
    raise error('give exactly one of grid and trials')

  if 'grid' in spec:
    grid = _flatten(spec['grid'])
    if not grid:
      raise error('grid: empty')
    for key, values in grid.items():
      if not isinstance(values, list | tuple) or not values:
        raise error(f'grid: {key}: needs a non-empty list of values, got {values!r}')
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
  else:
    trials = spec['trials']
    if not isinstance(trials, list | tuple) or not trials:
      raise error('trials: needs a non-empty list of dicts of overrides')
    if not all(isinstance(t, collections.abc.Mapping) for t in trials):
      raise error(f'trials: every trial must be a dict of overrides, got {trials!r}')
    points = [_flatten(t) for t in trials]

  overrides = _flatten(spec.get('overrides') or {})
  config = _load_module(base, f'sweep_base_{base.stem}').get_config()
  _check_overrides(config, spec['base'], overrides, 'overrides', error)
  for i, point in enumerate(points):
    _check_overrides(
      config, spec['base'], point, 'grid' if 'grid' in spec else f'trials[{i}]', error
    )

  width = max(3, len(str(len(points) - 1)))
  return Sweep(
    name=str(spec.get('name') or path.stem),
    path=path,
    base=base,
    overrides=overrides,
    trials=[Trial(i, trial_name(i, p, width), p) for i, p in enumerate(points)],
  )


def train_command(sweep: Sweep, trial: Trial, trial_dir, *, python=sys.executable, extra_args=()):
  """The `python -m launch train ...` argv of one trial."""
  overrides = {**sweep.overrides, **trial.overrides}
  return [
    python, '-m', 'launch', 'train', f'--config={sweep.base}',
    *(f'--config.{key}={flag_value(value)}' for key, value in overrides.items()),
    f'--workdir={trial_dir}', *extra_args,
  ]  # fmt: skip
