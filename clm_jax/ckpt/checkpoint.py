"""Orbax checkpoints: train state, data iterators, config, tokenizer, loop state.

Layout: workdir/checkpoints/<step>/
  state/          params, optimizer state, step (tensorstore arrays; blocks in
                  plain layer order whatever the pipeline layout)
  data/           each process's Grain iterator state, process_<i>-of-<n>.json
  config/         the resolved config (JSON)
  tokenizer/      the sentencepiece model's bytes (a uint8 array)
  loop/           what the metrics need to go on exactly (JSON)
  checksums.json  a CRC-32 of every file above (checksums.py)

Nothing is pickled. Saves are asynchronous: the loop waits only for the
device-to-host copy, and Orbax writes into a temporary directory that it
renames once every file is written and checksummed, so a crash mid-save
leaves no step that looks complete.

Restoring takes the newest intact step: its files match their checksums and
read back whole. A damaged step is skipped with a one-line warning naming it
and moved to checkpoints/<step>.damaged (kept, never deleted: the run saves
that step again). When every step is damaged, restoring refuses
(DamagedCheckpointError) unless told to start afresh. Entries that are not
checkpoints (a stray `999/`) count neither for resuming nor for retention.
"""

import pathlib
import re
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from clm_jax.ckpt import checksums

ITEMS = ('state', 'data', 'config', 'tokenizer', 'loop')
# What every process agrees on about a step fits in this many bytes.
_PROBLEM_BYTES = 1024
_TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX


class CheckpointError(ValueError):
  """A checkpoint does not fit the run (another model shape, say)."""


class DamagedCheckpointError(CheckpointError):
  """Every checkpoint of the run is damaged; nothing was changed."""


class _Damaged(Exception):
  """A step is damaged; the message says how, in a line."""


def _is_checkpoint(path) -> bool:
  """Whether a directory named by a step holds anything of a checkpoint (damaged or not)."""
  path = pathlib.Path(path)
  return any((path / name).exists() for name in ('_CHECKPOINT_METADATA', checksums.FILE, *ITEMS))


class _OnlyCheckpoints(ocp.path.step.NameFormat):
  """Orbax's step names, less the directories that are not checkpoints (a stray `999/`).

  Orbax counts every directory named by a number as a step: an empty `999/`
  would be the latest, so that retention deleted each new save.
  """

  def __init__(self):
    self._standard = ocp.path.step.standard_name_format()

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_all(self, base_path):
    return (m for m in self._standard.find_all(base_path) if _is_checkpoint(m.path))

  def find_step(self, base_path, step: int):
    found = self._standard.find_step(base_path, step)
    if not _is_checkpoint(found.path):
      raise ValueError(f'{found.path} is not a checkpoint.')
    return found


def _one_line(e: Exception) -> str:
  if isinstance(e, _Damaged):
    return str(e)
  # TensorStore appends its whole JSON spec, and some errors span lines.
  text = ' '.join(str(e).split(' [tensorstore_spec=')[0].split())
  return f'{type(e).__name__}: {text[:300]}'


def _agree(problem: str | None, *, from_main: bool = False) -> str | None:
  """The problem every process acts on: process 0's (`from_main`), else the first any met.

  Every process must restore the same step, or the first collective of
  training waits forever.
  """
  if jax.process_count() == 1:
    return problem
  row = np.zeros(_PROBLEM_BYTES, np.uint8)
  raw = (problem or '').encode()[:_PROBLEM_BYTES]
  row[: len(raw)] = np.frombuffer(raw, np.uint8)
  if from_main:
    rows = [multihost_utils.broadcast_one_to_all(row)]
  else:
    rows = multihost_utils.process_allgather(row)
  texts = [bytes(np.asarray(r)).rstrip(b'\0').decode(errors='replace') for r in rows]
  return next((t for t in texts if t), None)


def _quiet_closed_loops():
  """Drops the 'Event loop is closed' errors that follow a read Orbax gave up; returns the old hook.

  Orbax closes its event loop on the first error while TensorStore still has
  reads in flight; each one completes into the closed loop, now or later, and
  prints a traceback that says nothing about the checkpoint. Everything else
  reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'quiets_closed_loops', False):
    return previous

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
      previous(unraisable)

  hook.quiets_closed_loops = True
  sys.unraisablehook = hook
  return previous


def _move_aside(path: pathlib.Path, tag: str) -> pathlib.Path:
  target, n = path.with_name(f'{path.name}.{tag}'), 1
  while target.exists():
    target, n = path.with_name(f'{path.name}.{tag}.{n}'), n + 1
  path.rename(target)
  return target


class Checkpointer:
  """A CheckpointManager under `workdir/checkpoints` configured from `c.checkpoint`."""

  def __init__(self, workdir: pathlib.Path, c_checkpoint):
    self.directory = (pathlib.Path(workdir) / 'checkpoints').absolute()
    self._saving = None  # The step being saved, for `_checksum`; one save runs at a time.
    policies = [ocp.checkpoint_managers.LatestN(c_checkpoint.keep)]
    if c_checkpoint.keep_period:
      policies.append(ocp.checkpoint_managers.EveryNSteps(c_checkpoint.keep_period))
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        save_interval_steps=1,  # The loop decides when; see `save`.
        create=True,
        # Leftovers of saves a crash interrupted are not checkpoints.
        cleanup_tmp_directories=True,
        step_name_format=_OnlyCheckpoints(),
        # Runs on process 0 after every process's files are written, before
        # the rename that commits the step.
        async_options=ocp.AsyncOptions(post_finalization_callback=self._checksum),
      ),
      item_handlers={
        'state': ocp.StandardCheckpointHandler(),
        'data': grain.checkpoint.CheckpointHandler(),
        'config': ocp.JsonCheckpointHandler(),
        'tokenizer': ocp.StandardCheckpointHandler(),
        'loop': ocp.JsonCheckpointHandler(),
      },
    )

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, *, config: dict, tokenizer_path, loop: dict):
    """Starts an asynchronous save of everything a resumed run needs.

    Raises:
      CheckpointError: Orbax declined the save (it holds this step or a later one).
    """
    model = np.frombuffer(pathlib.Path(tokenizer_path).read_bytes(), np.uint8)
    self._manager.wait_until_finished()  # Orbax would too; then `_saving` is ours to set.
    self._saving = step
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config),
        tokenizer=ocp.args.StandardSave({'model': model}),
        loop=ocp.args.JsonSave(loop),
      ),
    )
    if not saved:
      raise CheckpointError(
        f'step {step} was not saved: {self.directory} already holds step '
        f'{self._manager.latest_step()}.'
      )

  def _checksum(self) -> None:
    tmp = self.directory / f'{self._saving}{_TMP_SUFFIX}'
    if not tmp.is_dir():
      raise CheckpointError(f'{tmp}, the save of step {self._saving}, is not there to checksum.')
    checksums.write(tmp)

  def restore_latest(self, abstract_state, data_iterator, *, restart_from_scratch: bool = False):
    """Restores the newest intact checkpoint, or returns None if there is none.

    Damaged steps (files that do not match their checksums, or that do not
    read back) are skipped with a one-line warning each, and moved to
    checkpoints/<step>.damaged once an older step restored (or
    `restart_from_scratch`), so that the run can save those steps again.
    Entries that are not checkpoints are ignored with a warning; one named by
    a step ahead of the run is moved to <name>.not-a-checkpoint, for the same
    reason. Every process takes the same decision.

    Args:
      abstract_state: The run's state as ShapeDtypeStructs with shardings;
        arrays are read straight into these shardings, whatever mesh wrote them.
      data_iterator: Set in place to the saved position when the checkpoint
        was written by as many processes as this run has; otherwise left at
        its start, with a warning that the resume is not exact.
      restart_from_scratch: When every checkpoint is damaged, return None
        (start afresh) instead of raising.

    Returns:
      (step, state, loop) or None.

    Raises:
      CheckpointError: The newest intact checkpoint holds another model (a
        parameter of another shape, or missing); older ones would too.
      DamagedCheckpointError: Every checkpoint is damaged, and not
        `restart_from_scratch`; nothing was changed.
    """
    is_main = jax.process_index() == 0
    start = data_iterator.get_state()  # A damaged step's data may have been read into it.
    unknown = self._unknown_entries() if is_main else []
    for path in unknown:
      logging.warning('%s is not a checkpoint: ignored', path)
    steps = sorted(self.all_steps(), reverse=True)
    damaged = {}
    for i, step in enumerate(steps):
      restored, problem = self._try(step, abstract_state, data_iterator)
      if problem is None:
        self._clear_the_way(damaged, unknown, step)
        return step, restored.state, restored.loop
      damaged[step] = problem
      if is_main:
        then = f'trying step {steps[i + 1]}' if i + 1 < len(steps) else 'no older step'
        logging.warning(
          'checkpoint %s is damaged (%s); %s', self.directory / str(step), problem, then
        )
    if damaged and not restart_from_scratch:
      raise DamagedCheckpointError(
        f'every checkpoint in {self.directory} is damaged: '
        + '; '.join(f'step {step}: {problem}' for step, problem in damaged.items())
        + '. Nothing was changed. Put back intact copies, or pass --restart_from_scratch to '
        'train from step 0 (the damaged steps are then kept as <step>.damaged).'
      )
    self._clear_the_way(damaged, unknown, 0)
    data_iterator.set_state(start)
    return None

  def _try(self, step: int, abstract_state, data_iterator):
    """(restored, None), or (None, the damage in a line) as every process agrees."""
    path = self.directory / str(step)
    problem = None
    if jax.process_index() == 0:
      # One process reads every file (the others would read the same bytes).
      if checksums.present(path):
        problem = checksums.verify(path)
      else:
        logging.warning(
          'checkpoint %s has no %s (saved before checkpoints were checksummed): restoring it '
          'unverified',
          path,
          checksums.FILE,
        )
    if problem := _agree(problem, from_main=True):
      return None, problem
    restored, hook = None, _quiet_closed_loops()
    try:
      self._check_shapes(step, abstract_state)
      restored = self._restore(step, abstract_state, data_iterator)
      sys.unraisablehook = hook  # Nothing failed, so nothing completes late.
    except CheckpointError:
      sys.unraisablehook = hook
      raise
    except Exception as e:  # noqa: BLE001  Any damage the checksums missed: an older step.
      problem = _one_line(e)  # The quiet hook stays, for the reads that end later.
    if problem := _agree(problem):
      return None, problem
    return restored, None

  def _unknown_entries(self) -> list[pathlib.Path]:
    known = {str(step) for step in self.all_steps()}
    return sorted(
      p
      for p in self.directory.iterdir()
      if p.name not in known
      and _TMP_SUFFIX not in p.name  # Orbax deletes these (`cleanup_tmp_directories`).
      and not re.search(r'\.(damaged|not-a-checkpoint)(\.\d+)?$', p.name)
    )

  def _clear_the_way(self, damaged: dict[int, str], unknown, start: int) -> None:
    """Moves aside the damaged steps, and entries named by a step after `start`.

    A save of step N is declined while checkpoints/N exists, or is lost to
    retention while a later step does.
    """
    if jax.process_index() == 0:
      moved = [_move_aside(self.directory / str(step), 'damaged') for step in damaged]
      moved += [
        _move_aside(p, 'not-a-checkpoint')
        for p in unknown
        if re.fullmatch(r'0|[1-9]\d*', p.name) and int(p.name) > start  # Orbax's step names.
      ]
      if moved:
        logging.warning(
          'moved aside, kept for inspection (a save of their steps would collide): %s',
          ', '.join(str(p) for p in moved),
        )
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('clm_jax: checkpoints moved aside')
    self._manager.reload()

  def _restore(self, step, abstract_state, data_iterator):
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
    )
    items = dict(state=ocp.args.StandardRestore(target), loop=ocp.args.JsonRestore())
    if self._data_restorable(step):
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    elif jax.process_index() == 0:
      logging.warning(
        'checkpoint %s/%d holds the data position of another number of processes: each of the '
        '%d processes starts its share of the data afresh, so this resume is not exact',
        self.directory,
        step,
        jax.process_count(),
      )
    return self._manager.restore(step, args=ocp.args.Composite(**items))

  def _data_restorable(self, step: int) -> bool:
    """Whether the step holds this process's data position; False: another process count's.

    Raises:
      _Damaged: This process's file is missing, or no process count's set is whole.
    """
    data = self.directory / str(step) / 'data'
    written = {}  # processes -> the indices of their files
    for path in data.glob('process_*-of-*.json'):
      if m := re.fullmatch(r'process_(\d+)-of-(\d+)\.json', path.name):
        written.setdefault(int(m[2]), set()).add(int(m[1]))
    own = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if jax.process_count() in written or not written:
      if not (data / own).is_file():
        raise _Damaged(f'data/{own} is missing')
      return True
    if not any(indices == set(range(n)) for n, indices in written.items()):
      raise _Damaged('data/ holds no whole set of process_<i>-of-<n>.json files')
    return False

  def _check_shapes(self, step: int, abstract_state) -> None:
    if not (self.directory / str(step) / 'state' / '_METADATA').is_file():
      raise _Damaged('state/_METADATA is missing')
    saved = self._manager.item_metadata(step)['state']
    saved = {key_of(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree_of(saved))[0]}
    if not saved:
      raise _Damaged('state/_METADATA lists no arrays')
    for path, want in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
      key = key_of(path)
      if key not in saved:
        raise CheckpointError(
          f'{self.directory / str(step)} has no {key}: it was written by another model or '
          'optimizer. Use a new --workdir, or the config that wrote it.'
        )
      if tuple(saved[key].shape) != tuple(want.shape):
        raise CheckpointError(
          f'{self.directory / str(step)}: {key} has shape {tuple(saved[key].shape)} but this '
          f'model needs {tuple(want.shape)}. Use a new --workdir, or the config that wrote it.'
        )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def tree_of(metadata):
  return metadata.tree if hasattr(metadata, 'tree') else metadata


def key_of(path) -> str:
  """'params/blocks/attn/wq' for a tree path (attribute, dict and index keys alike)."""
  parts = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return '/'.join(parts)


def read_only(directory, items, handlers):
  return ocp.CheckpointManager(
    directory,
    item_names=items,
    item_handlers=handlers,
    options=ocp.CheckpointManagerOptions(read_only=True, step_name_format=_OnlyCheckpoints()),
  )
