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
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from clm_jax import config as config_lib
from clm_jax import model as model_lib
from clm_jax import sharding as sharding_lib

ITEMS = ('state', 'data', 'config', 'tokenizer', 'loop')
TOKENIZER_FILE = 'tokenizer.model'


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
    saved = {_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(_tree(saved))[0]}
    for path, want in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
      key = _key(path)
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


def _tree(metadata):
  return metadata.tree if hasattr(metadata, 'tree') else metadata


def _key(path) -> str:
  """'params/blocks/attn/wq' for a tree path (attribute, dict and index keys alike)."""
  parts = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return '/'.join(parts)


def _read_only(directory, items, handlers):
  return ocp.CheckpointManager(
    directory,
    item_names=items,
    item_handlers=handlers,
    options=ocp.CheckpointManagerOptions(read_only=True),
  )


def _abstract_params(config: dict, dtype=None, mesh=None):
  """The model's params as ShapeDtypeStructs, from a saved config.

  On one device without a mesh, else in the shardings of `sharding.RULES`.
  """
  cfg = config_lib.ModelConfig.from_config(ml_collections.ConfigDict(config['model']))
  _, abstract, axes = model_lib.abstract(cfg)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = sharding_lib.param_shardings(axes, abstract, mesh)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), abstract, shardings
  )


def to_params(workdir, output, *, dtype: str = 'bfloat16', step: int | None = None) -> dict:
  """Writes the params of a training checkpoint, cast to `dtype`, as a params-only checkpoint.

  The output (output/0/{params,config,tokenizer}) is what inference and
  fine-tuning load with `load_params`: no optimizer state, a fraction of the
  size. Params are read alone (a partial restore), never the whole state.

  Args:
    workdir: The run directory whose checkpoints/ are read.
    output: Where the params-only checkpoint goes; must not exist yet.
    dtype: The dtype of the written params, e.g. 'bfloat16' or 'float32'.
    step: Which step; None = the latest.

  Returns:
    {'step', 'output', 'bytes'}: what was written.
  """
  output = pathlib.Path(output).absolute()
  if output.exists():  # Before reading anything.
    raise FileExistsError(f'--output={output} exists; choose a new directory.')
  step, params, config, tokenizer = read_params(workdir, step=step)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  size = save_params(output, params, config, tokenizer)
  return {'step': step, 'output': str(output), 'bytes': size}


def read_params(workdir, *, step: int | None = None, mesh=None):
  """The params of a training checkpoint in workdir/checkpoints, read alone.

  Args:
    workdir: The run directory.
    step: Which step; None = the latest.
    mesh: Read straight into the shardings of `sharding.RULES` on this mesh;
      None = onto one device.

  Returns:
    (step, params in their saved dtype, config dict, tokenizer model bytes).
  """
  directory = (pathlib.Path(workdir) / 'checkpoints').absolute()
  handlers = {
    'state': ocp.PyTreeCheckpointHandler(),
    'config': ocp.JsonCheckpointHandler(),
    'tokenizer': ocp.StandardCheckpointHandler(),
  }
  with _read_only(directory, ('state', 'config', 'tokenizer'), handlers) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{directory} holds no checkpoint.')
    meta = manager.restore(
      step,
      args=ocp.args.Composite(config=ocp.args.JsonRestore(), tokenizer=ocp.args.StandardRestore()),
    )
    abstract = _abstract_params(meta.config, mesh=mesh)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
    state = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item={'params': abstract}, restore_args={'params': restore_args}, partial_restore=True
        )
      ),
    ).state
  tokenizer = np.asarray(meta.tokenizer['model']).tobytes()
  return step, state['params'], meta.config, tokenizer


def save_params(output, params, config: dict, tokenizer: bytes | None) -> int:
  """Writes a params-only checkpoint, output/0/{params,config[,tokenizer]}.

  Args:
    output: The directory; must not exist yet.
    params: The params tree, in the dtype it is to be stored in.
    config: The resolved config as a dict; `load_params` reads its `model`.
    tokenizer: The sentencepiece model's bytes, or None for a checkpoint
      without one (e.g. converted from a Hugging Face directory that had none).

  Returns:
    The bytes written.
  """
  output = pathlib.Path(output).absolute()
  if output.exists():
    raise FileExistsError(f'--output={output} exists; choose a new directory.')
  items = dict(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config))
  if tokenizer:
    items['tokenizer'] = ocp.args.StandardSave({'model': np.frombuffer(tokenizer, np.uint8)})
  with ocp.CheckpointManager(
    output,
    item_names=tuple(items),
    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
  ) as manager:
    manager.save(0, args=ocp.args.Composite(**items))
  if tokenizer:
    # Beside the checkpoint too, where a run or a HF directory keeps it, so that
    # `train.init_from` finds the tokenizer of any of the three alike.
    (output / TOKENIZER_FILE).write_bytes(tokenizer)
  return sum(p.stat().st_size for p in output.rglob('*') if p.is_file())


def load_pretrained(path, like, mesh):
  """Pre-trained params for fine-tuning, in the shapes, dtypes and shardings of `like`.

  Args:
    path: A run directory, a params-only checkpoint or a Hugging Face Llama
      directory (`train.init_from`).
    like: The params tree to fill (arrays or ShapeDtypeStructs with shardings),
      blocks in plain layer order.
    mesh: The training mesh.

  Raises:
    CheckpointError: The pre-trained model has another shape, named by parameter.
  """
  import clm_jax

  loaded = clm_jax.load(path, mesh).params
  want = {_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
  got = {_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  if set(want) != set(got):
    raise CheckpointError(
      f'train.init_from={path}: its params {sorted(set(got) - set(want))} are not in this '
      f'model, which needs {sorted(set(want) - set(got))}.'
    )
  for key, x in want.items():
    if got[key].shape != x.shape:
      raise CheckpointError(
        f'train.init_from={path}: params/{key} has shape {got[key].shape} but this model '
        f"needs {x.shape}; set model.* to the pre-trained model's shape."
      )
  return jax.tree.map(
    lambda x, ref: jax.device_put(x.astype(ref.dtype), ref.sharding), loaded, like
  )


def load_params(directory, *, mesh=None):
  """Reads a params-only checkpoint written by `to_params` or `save_params`.

  Args:
    directory: The checkpoint (holding 0/params).
    mesh: Read straight into the shardings of `sharding.RULES` on this mesh;
      None = onto one device.

  Returns:
    (params, config dict, tokenizer model bytes or None if it has none).
  """
  directory = pathlib.Path(directory).absolute()
  handlers = {
    'params': ocp.StandardCheckpointHandler(),
    'config': ocp.JsonCheckpointHandler(),
    'tokenizer': ocp.StandardCheckpointHandler(),
  }
  with _read_only(directory, ('params', 'config', 'tokenizer'), handlers) as manager:
    if manager.latest_step() is None:
      raise FileNotFoundError(
        f'{directory} is not a params-only checkpoint (`convert --to_params`).'
      )
    has_tokenizer = (directory / '0' / 'tokenizer').is_dir()
    items = dict(config=ocp.args.JsonRestore())
    if has_tokenizer:
      items['tokenizer'] = ocp.args.StandardRestore()
    meta = manager.restore(0, args=ocp.args.Composite(**items))
    saved = manager.item_metadata(0)['params']
    dtypes = {_key(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(_tree(saved))[0]}
    abstract = _abstract_params(meta.config, mesh=mesh)
    abstract = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, dtypes[_key(p)], sharding=x.sharding), abstract
    )
    params = manager.restore(
      0, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
    ).params
  tokenizer = np.asarray(meta.tokenizer['model']).tobytes() if has_tokenizer else None
  return params, meta.config, tokenizer
