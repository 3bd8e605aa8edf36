"""What a sweep's trials reached: summary.csv, summary.md and loss_curves.png.

Read from the trial directories alone, so a summary can be written at any time.
A step logged twice (a trial resumed from an earlier checkpoint) counts once:
the later line.
"""

import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import statistics

# A bare Figure, not pyplot: it renders with Agg and never touches a display or the
# process-wide backend.
from matplotlib import figure

STATUS = 'status.json'
COLUMNS = ('status', 'final_loss', 'eval_loss', 'tokens_per_sec', 'steps')


@dataclasses.dataclass(frozen=True)
class Curves:
  """A trial's logged metrics, one entry per step, in step order."""

  train: list[dict]  # Lines with a `loss`.
  eval: list[dict]  # Lines with an `eval_loss`.

  @property
  def last_step(self) -> int:
    return max((m['step'] for m in self.train + self.eval), default=0)


def read_curves(trial_dir: pathlib.Path) -> Curves:
  """The trial's metrics.jsonl (empty curves where there is none yet)."""
  train, evals = {}, {}
  path = pathlib.Path(trial_dir) / 'metrics.jsonl'
  lines = path.read_text().splitlines() if path.exists() else []
  for line in lines:
    try:
      m = json.loads(line)
    except json.JSONDecodeError:  # The last line of a run killed mid-write.
      continue
    if 'loss' in m:
      train[m['step']] = m
    if 'eval_loss' in m:
      evals[m['step']] = m
  return Curves(
    train=[train[s] for s in sorted(train)],
    eval=[evals[s] for s in sorted(evals)],
  )


def steps_wanted(trial_dir: pathlib.Path) -> int | None:
  """train.steps of the trial's resolved config, or None before the run wrote it."""
  path = pathlib.Path(trial_dir) / 'config.json'
  try:
    return int(json.loads(path.read_text())['train']['steps'])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def is_complete(trial_dir: pathlib.Path) -> bool:
  """Whether the trial logged its last step (training ran to the end, not stopped)."""
  wanted = steps_wanted(trial_dir)
  return wanted is not None and read_curves(trial_dir).last_step >= wanted


def read_status(trial_dir: pathlib.Path) -> dict:
  """The trial's status.json; {} where there is none (never run, or still running)."""
  try:
    return json.loads((pathlib.Path(trial_dir) / STATUS).read_text())
  except (OSError, ValueError):
    return {}


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes via a temporary file, so that a reader (or a crash) never sees half a file."""
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def _row(trial, trial_dir: pathlib.Path, keys) -> dict:
  curves = read_curves(trial_dir)
  status = read_status(trial_dir).get('status')
  if status is None:
    status = 'unfinished' if trial_dir.exists() else 'pending'
  speeds = [m['tokens_per_sec'] for m in curves.train if 'tokens_per_sec' in m]
  return {
    'trial': trial.name,
    **{key: trial.overrides.get(key) for key in keys},
    'status': status,
    'final_loss': curves.train[-1]['loss'] if curves.train else None,
    'eval_loss': curves.eval[-1]['eval_loss'] if curves.eval else None,
    'tokens_per_sec': statistics.median(speeds) if speeds else None,
    'steps': curves.last_step,
  }


def _cell(key: str, value) -> str:
  if value is None:
    return ''
  if key == 'tokens_per_sec':
    return f'{value:,.0f}'
  if key in ('final_loss', 'eval_loss'):
    return f'{value:.4f}'
  return str(value)


def markdown(rows: list[dict]) -> str:
  """A Markdown table of summary rows."""
  if not rows:
    return ''
  header = list(rows[0])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(_cell(k, row[k]) for k in header) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def _csv(rows: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator='\n')
  writer.writeheader()
  writer.writerows({k: '' if v is None else v for k, v in row.items()} for row in rows)
  return out.getvalue()


def plot(sweep, workdir: pathlib.Path, path: pathlib.Path) -> None:
  """Training loss against step, one line per trial; held-out losses as markers."""
  fig = figure.Figure(figsize=(9, 5.5), layout='constrained')
  ax = fig.subplots()
  plotted = False
  for trial in sweep.trials:
    curves = read_curves(workdir / trial.name)
    train = [m for m in curves.train if math.isfinite(m['loss'])]
    if not train:
      continue
    (line,) = ax.plot([m['step'] for m in train], [m['loss'] for m in train], label=trial.name)
    if curves.eval:
      ax.plot(
        [m['step'] for m in curves.eval],
        [m['eval_loss'] for m in curves.eval],
        linestyle='none',
        marker='o',
        color=line.get_color(),
      )
    plotted = True
  ax.set(xlabel='step', ylabel='loss (o: held-out)', title=f'sweep {sweep.name}')
  if plotted:
    ax.set_yscale('log')
    ax.legend(fontsize='small')
  ax.grid(True, which='both', alpha=0.3)
  # Written beside the target, then moved: an array task's reader never sees half a PNG.
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp.png')
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, path)


def summarize(sweep, workdir) -> list[dict]:
  """Writes summary.csv, summary.md and loss_curves.png under `workdir`; prints the table.

  Returns one dict per trial: `trial`, each varied key, `status` (also
  'unfinished': started, never recorded; 'pending': never started),
  `final_loss`, `eval_loss`, `tokens_per_sec` (median) and `steps`; None where
  missing.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = [_row(trial, workdir / trial.name, sweep.keys) for trial in sweep.trials]
  table = markdown(rows)
  write_atomic(workdir / 'summary.csv', _csv(rows))
  write_atomic(workdir / 'summary.md', f'# Sweep {sweep.name}\n\n{table}')
  plot(sweep, workdir, workdir / 'loss_curves.png')
  print(table, end='', flush=True)
  return rows
