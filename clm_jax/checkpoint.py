"""Orbax checkpoints of the train state and the data iterator's position.

Layout: workdir/checkpoints/<step>/{state, data}. `state` holds params,
optimizer state and step as tensorstore arrays (no pickle); `data` is the
Grain iterator state as JSON. Saves are asynchronous: the loop waits only
for the device-to-host copy.
"""

import pathlib

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A CheckpointManager under `workdir/checkpoints` configured from `c.checkpoint`."""

  def __init__(self, workdir: pathlib.Path, c_checkpoint):
    self.directory = (workdir / 'checkpoints').absolute()
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_names=('state', 'data'),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=c_checkpoint.keep,
        save_interval_steps=1,  # The loop decides when; see `save`.
        create=True,
      ),
      item_handlers={
        'state': ocp.StandardCheckpointHandler(),
        'data': grain.checkpoint.CheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
      ),
    )

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores into `abstract_state`'s shardings; advances `data_iterator` in place."""
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      abstract_state,
    )
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
      ),
    )
    return restored.state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
