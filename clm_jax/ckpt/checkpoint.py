"""Orbax checkpoints: train state, data iterators, config, tokenizer, loop state.

Layout: workdir/checkpoints/<step>/
  state/      params, optimizer state, step (tensorstore arrays; blocks in
              plain layer order whatever the pipeline layout)
  data/       each process's Grain iterator state, process_<i>-of-<n>.json
  config/     the resolved config (JSON)
  tokenizer/  the sentencepiece model's bytes (a uint8 array)
  loop/       what the metrics need to go on exactly (JSON)

Nothing is pickled. Saves are asynchronous: the loop waits only for the
device-to-host copy, and Orbax writes into a temporary directory that it
renames when every file is written, so a crash mid-save leaves no step that
looks complete. Restoring takes the newest step that reads back whole; a
damaged one is skipped with a warning naming it.
"""

import pathlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ('state', 'data', 'config', 'tokenizer', 'loop')


class CheckpointError(ValueError):
  """A checkpoint does not fit the run (another model shape, say)."""


class Checkpointer:
  """A CheckpointManager under `workdir/checkpoints` configured from `c.checkpoint`."""

  def __init__(self, workdir: pathlib.Path, c_checkpoint):
    self.directory = (pathlib.Path(workdir) / 'checkpoints').absolute()
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
    """Starts an asynchronous save of everything a resumed run needs."""
    model = np.frombuffer(pathlib.Path(tokenizer_path).read_bytes(), np.uint8)
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config),
        tokenizer=ocp.args.StandardSave({'model': model}),
        loop=ocp.args.JsonSave(loop),
      ),
    )

  def restore_latest(self, abstract_state, data_iterator):
    """Restores the newest readable checkpoint, or returns None if there is none.

    Args:
      abstract_state: The run's state as ShapeDtypeStructs with shardings;
        arrays are read straight into these shardings, whatever mesh wrote them.
      data_iterator: Set in place to the saved position when the checkpoint
        was written by as many processes as this run has; otherwise left at
        its start (see `data_restorable`).

    Returns:
      (step, state, loop) or None.

    Raises:
      CheckpointError: The newest checkpoint holds another model (a parameter
        of another shape, or missing); older ones would too.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      path = self.directory / str(step)
      try:
        self._check_shapes(step, abstract_state)
        restored = self._restore(step, abstract_state, data_iterator)
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001  Any damage: fall back to an older step.
        logging.warning(
          'checkpoint %s is unreadable (%s: %s); trying an older one', path, type(e).__name__, e
        )
        continue
      return step, restored.state, restored.loop
    return None

  def _restore(self, step, abstract_state, data_iterator):
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
    )
    items = dict(state=ocp.args.StandardRestore(target), loop=ocp.args.JsonRestore())
    if self.data_restorable(step):
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
      logging.warning(
        'checkpoint %s/%d holds the data position of another number of processes; '
        'each of the %d processes starts its share of the data afresh',
        self.directory,
        step,
        jax.process_count(),
      )
    return self._manager.restore(step, args=ocp.args.Composite(**items))

  def data_restorable(self, step: int) -> bool:
    """Whether the step's data state was written by as many processes as now run."""
    name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    return (self.directory / str(step) / 'data' / name).is_file()

  def _check_shapes(self, step: int, abstract_state) -> None:
    saved = self._manager.item_metadata(step)['state']
    saved = {key_of(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree_of(saved))[0]}
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
    options=ocp.CheckpointManagerOptions(read_only=True),
  )
