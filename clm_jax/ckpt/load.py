"""One reader for every model format: a run, a params-only checkpoint, a Hugging Face dir."""

import dataclasses
import json
import pathlib

import jax
import ml_collections

from clm_jax import config as config_lib
from clm_jax.ckpt import checkpoint
from clm_jax.ckpt import hf
from clm_jax.ckpt import params as params_lib
from clm_jax.data import tokenizer as tokenizer_lib


def kind(path) -> str:
  """'run', 'params' or 'hf': what `path` holds.

  Raises:
    FileNotFoundError: `path` is none of these.
  """
  path = pathlib.Path(path).expanduser()
  config_json = path / 'config.json'
  # A run directory holds its resolved clm_jax config as config.json too.
  if (path / 'checkpoints').is_dir() or (
    config_json.is_file() and 'model' in json.loads(config_json.read_text())
  ):
    return 'run'
  if (path / '0' / 'params').is_dir():
    return 'params'
  if config_json.is_file() or list(path.glob('*.safetensors')):
    return 'hf'
  raise FileNotFoundError(
    f'{path} is neither a Hugging Face model directory (config.json + *.safetensors), a '
    'clm_jax run directory (checkpoints/) nor a params-only checkpoint (0/params).'
  )


def read(path, mesh=None, dtype: str | None = None):
  """(ModelConfig, params, Tokenizer or None) of any model format; see `clm_jax.load`."""
  path = pathlib.Path(path).expanduser()
  if kind(path) == 'hf':
    cfg, params = hf.load_hf(path, mesh, dtype)
    tok = path / tokenizer_lib.TOKENIZER_FILE
    return cfg, params, tokenizer_lib.load(tok) if tok.is_file() else None
  _, params, config, tok = params_lib.read(path, mesh=mesh)
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  cfg = config_lib.ModelConfig.from_config(ml_collections.ConfigDict(config['model']))
  # Inference settings: compute in the params' dtype (as HF does), no remat.
  stored = jax.tree.leaves(params)[0].dtype.name
  cfg = dataclasses.replace(cfg, param_dtype=stored, dtype=stored, remat='none')
  return cfg, params, tokenizer_lib.from_bytes(tok, str(path)) if tok else None


def load_pretrained(path, like, mesh):
  """Pre-trained params for fine-tuning, in the shapes, dtypes and shardings of `like`.

  Args:
    path: A run directory, a params-only checkpoint or a Hugging Face Llama
      directory (`train.init_from`).
    like: The params tree to fill (arrays or ShapeDtypeStructs with shardings),
      blocks in plain layer order.
    mesh: The training mesh.

  Raises:
    checkpoint.CheckpointError: The pre-trained model has another shape, named by parameter.
  """
  _, loaded, _ = read(path, mesh)
  want = {checkpoint.key_of(p): x for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
  got = {checkpoint.key_of(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  if set(want) != set(got):
    raise checkpoint.CheckpointError(
      f'train.init_from={path}: its params {sorted(set(got) - set(want))} are not in this '
      f'model, which needs {sorted(set(want) - set(got))}.'
    )
  for key, x in want.items():
    if got[key].shape != x.shape:
      raise checkpoint.CheckpointError(
        f'train.init_from={path}: params/{key} has shape {got[key].shape} but this model '
        f"needs {x.shape}; set model.* to the pre-trained model's shape."
      )
  return jax.tree.map(
    lambda x, ref: jax.device_put(x.astype(ref.dtype), ref.sharding), loaded, like
  )
