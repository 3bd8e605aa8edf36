"""A loaded model for notebooks and scripts: config, sharded params, tokenizer, logits, generate."""

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clm_jax.ckpt import load as load_lib
from clm_jax.inference import generate as generate_lib
from clm_jax.model import decoder


@dataclasses.dataclass
class Model:
  """A loaded model: config, params (blocks stacked in plain layer order) and tokenizer.

  It computes in the params' dtype; `tokenizer` is None where the source has
  none, `mesh` None on one device.
  """

  config: Any
  params: dict
  tokenizer: Any = None
  mesh: Any = None
  _logits_fn: Any = dataclasses.field(default=None, init=False, repr=False)

  def logits(self, tokens):
    """Float32 logits [B, T, V] of unpadded rows of token ids [B, T] (a list of lists too)."""
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
      graphdef, _, _ = decoder.abstract(self.config)

      def logits_fn(params, tokens_BT):
        # Each row is one document from position 0.
        positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        return decoder.apply(graphdef, params, tokens_BT, jnp.ones_like(tokens_BT), positions_BT)

      self._logits_fn = jax.jit(logits_fn)
    with self._mesh():
      return np.asarray(self._logits_fn(self.params, tokens))

  def generate(self, *args, **kwargs):
    """`clm_jax.inference.generate.generate(self.config, self.params, *args, **kwargs)`."""
    with self._mesh():
      return generate_lib.generate(self.config, self.params, *args, **kwargs)

  def _mesh(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()


def load(path, mesh=None, *, dtype: str | None = None) -> Model:
  """Loads a model from a Hugging Face Llama directory or a clm_jax checkpoint.

  Args:
    path: A HF directory (config.json + *.safetensors), a clm_jax run
      directory (its latest checkpoint) or a params-only checkpoint
      (`python -m launch convert --to_params`).
    mesh: Shard the params over this mesh; None = one device.
    dtype: Cast the params ('float32', 'bfloat16', ...); None = as stored.
  """
  cfg, params, tok = load_lib.read(path, mesh, dtype)
  return Model(cfg, params, tok, mesh)
