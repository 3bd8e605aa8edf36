"""Params-only checkpoints: output/0/{params,config[,tokenizer]}, a fraction of a train state.

`read` takes either kind of clm_jax checkpoint (a run directory or a params-only
one) and returns its params alone, read without the optimizer state.
"""

import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from clm_jax import config as config_lib
from clm_jax.ckpt import checkpoint
from clm_jax.ckpt import checksums
from clm_jax.data import tokenizer as tokenizer_lib
from clm_jax.model import decoder as model_lib
from clm_jax.parallel import sharding as sharding_lib


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

  Raises:
    checkpoint.CheckpointError: The step's files do not match their checksums.
  """
  directory = (pathlib.Path(workdir) / 'checkpoints').absolute()
  handlers = {
    'state': ocp.PyTreeCheckpointHandler(),
    'config': ocp.JsonCheckpointHandler(),
    'tokenizer': ocp.StandardCheckpointHandler(),
  }
  with checkpoint.read_only(directory, ('state', 'config', 'tokenizer'), handlers) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{directory} holds no checkpoint.')
    path = directory / str(step)
    if checksums.present(path) and (problem := checksums.verify(path)):
      raise checkpoint.CheckpointError(f'{path} is damaged ({problem}); choose another --step.')
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
    (output / tokenizer_lib.TOKENIZER_FILE).write_bytes(tokenizer)
  return sum(p.stat().st_size for p in output.rglob('*') if p.is_file())


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
  with checkpoint.read_only(directory, ('params', 'config', 'tokenizer'), handlers) as manager:
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
    dtypes = {
      checkpoint.key_of(p): x.dtype
      for p, x in jax.tree_util.tree_flatten_with_path(checkpoint.tree_of(saved))[0]
    }
    abstract = _abstract_params(meta.config, mesh=mesh)
    abstract = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, dtypes[checkpoint.key_of(p)], sharding=x.sharding),
      abstract,
    )
    params = manager.restore(
      0, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
    ).params
  tokenizer = np.asarray(meta.tokenizer['model']).tobytes() if has_tokenizer else None
  return params, meta.config, tokenizer


def read(path, *, step: int | None = None, mesh=None):
  """The params of either kind of clm_jax checkpoint, read alone.

  Args:
    path: A run directory (its latest checkpoint, or `step`) or a params-only
      checkpoint.
    step: With a run directory: which step; None = the latest.
    mesh: As for `read_params`.

  Returns:
    (step or None for a params-only checkpoint, params, config dict, tokenizer
    model bytes or None).
  """
  path = pathlib.Path(path)
  if (path / 'checkpoints').is_dir():
    return read_params(path, step=step, mesh=mesh)
  return (None, *load_params(path, mesh=mesh))
