"""clm_jax: training CodeLlama-class code language models in JAX/Flax.

`clm_jax.load(path)` is the entry for notebooks and scripts:

  model = clm_jax.load('runs/default')       # or a HF Llama directory
  logits = model.logits([[1, 306, 4658]])    # [B, T, V] float32 NumPy

Importing the package is cheap: JAX and the model load on the first `load`.
"""

import dataclasses
import pathlib
from typing import Any

__version__ = '0.1.0'


@dataclasses.dataclass
class Model:
  """A loaded model: config, params (on devices) and tokenizer.

  Attributes:
    config: The `clm_jax.config.ModelConfig`; it computes in the params' dtype.
    params: The params tree, blocks stacked in plain layer order.
    tokenizer: A `clm_jax.tokenizer.Tokenizer`, or None where the source has none.
    mesh: The mesh the params are sharded over, or None (one device).
  """

  config: Any
  params: dict
  tokenizer: Any = None
  mesh: Any = None
  _logits_fn: Any = dataclasses.field(default=None, init=False, repr=False)

  def logits(self, tokens):
    """Float32 logits [B, T, V] of unpadded rows of token ids [B, T] (a list of lists too)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clm_jax import model as model_lib

    try:
      tokens = np.asarray(tokens, dtype=np.int32)
    except ValueError as e:
      raise ValueError(f'tokens must be [B, T] with rows of one length (no padding): {e}') from e
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [B, T], got shape {tokens.shape}.')
    if tokens.size and not 0 <= tokens.min() <= tokens.max() < self.config.vocab_size:
      raise ValueError(
        f'token ids must be in [0, {self.config.vocab_size}); got {tokens.min()}..{tokens.max()}.'
      )
    if self._logits_fn is None:
      graphdef, _, _ = model_lib.abstract(self.config)

      def logits_fn(params, tokens_BT):
        # Each row is one document from position 0.
        positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        return model_lib.apply(graphdef, params, tokens_BT, jnp.ones_like(tokens_BT), positions_BT)

      self._logits_fn = jax.jit(logits_fn)
    if self.mesh is None:
      return np.asarray(self._logits_fn(self.params, tokens))
    with jax.set_mesh(self.mesh):
      return np.asarray(self._logits_fn(self.params, tokens))

  def generate(self, *args, **kwargs):
    """`clm_jax.generate.generate(self.config, self.params, *args, **kwargs)`."""
    import contextlib

    import jax

    from clm_jax import generate

    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      return generate.generate(self.config, self.params, *args, **kwargs)


def load(path, mesh=None, *, dtype: str | None = None) -> Model:
  """Loads a model from a Hugging Face Llama directory or a clm_jax checkpoint.

  Args:
    path: A HF directory (config.json + *.safetensors), a clm_jax run
      directory (its latest checkpoint) or a params-only checkpoint
      (`python -m launch convert --to_params`).
    mesh: Shard the params over this mesh by `clm_jax.sharding.RULES`;
      None = one device.
    dtype: Cast the params to this dtype ('float32', 'bfloat16', ...);
      None = as stored. The model computes in the params' dtype.

  Returns:
    A `Model`.

  Raises:
    FileNotFoundError: `path` is none of these, or a run without a checkpoint.
  """
  import json

  import jax
  import ml_collections

  from clm_jax import checkpoint
  from clm_jax import config as config_lib
  from clm_jax import hf
  from clm_jax import tokenizer as tokenizer_lib

  path = pathlib.Path(path).expanduser()
  config_json = path / 'config.json'
  # A run directory holds its resolved clm_jax config as config.json too.
  is_run = (path / 'checkpoints').is_dir() or (
    config_json.is_file() and 'model' in json.loads(config_json.read_text())
  )
  if is_run:
    _, params, config, tok = checkpoint.read_params(path, mesh=mesh)
  elif (path / '0' / 'params').is_dir():
    params, config, tok = checkpoint.load_params(path, mesh=mesh)
  elif config_json.is_file() or list(path.glob('*.safetensors')):
    cfg, params = hf.load_hf(path, mesh, dtype)
    tok = path / hf.TOKENIZER_FILE
    return Model(cfg, params, tokenizer_lib.load(tok) if tok.is_file() else None, mesh)
  else:
    raise FileNotFoundError(
      f'{path} is neither a Hugging Face model directory (config.json + *.safetensors), a '
      'clm_jax run directory (checkpoints/) nor a params-only checkpoint (0/params).'
    )
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  cfg = config_lib.ModelConfig.from_config(ml_collections.ConfigDict(config['model']))
  # Inference settings: compute in the params' dtype (as HF does), no remat.
  stored = jax.tree.leaves(params)[0].dtype.name
  cfg = dataclasses.replace(cfg, param_dtype=stored, dtype=stored, remat='none')
  tok = hf.tokenizer_from_bytes(tok, str(path)) if tok else None
  return Model(cfg, params, tok, mesh)
