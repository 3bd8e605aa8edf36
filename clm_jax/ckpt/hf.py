"""Hugging Face Llama / CodeLlama checkpoints in and out: one key map, per-key transforms.

HF keeps each layer's weights as separate torch-layout matrices [out, in];
clm_jax stacks every block parameter along a leading `layers` axis and keeps
heads as an axis of their own. `KEYS` lists each correspondence once, and
import and export both walk it.

Rotary layout: HF Llama rotates dimension i of a head with i + H/2
("rotate_half"; Meta's interleaved weights were permuted into it when they
were converted to HF), and so does `layers.rotary`: q and k rows are copied
as they are, with no interleave permutation.

Hostile files: every config.json and index key is checked before use, an
index names files inside the directory only, and any file safetensors cannot
read, config.json that is not JSON, or size that is not a positive integer
gives one HFError naming the file and key.

Memory: one tensor at a time. Import reads a tensor, reshapes it on the host
and puts it straight into its sharding; a stacked block parameter is
allocated sharded and filled layer by layer by a donating update. Export
fetches one layer's slice at a time and streams it into a safetensors file
whose header is written first, from the shapes alone. Either way the host
holds about 1.6 x the largest tensor beyond the params (measured), whatever the model's size.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import reprlib
import stat

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
import tqdm
from sentencepiece import sentencepiece_model_pb2

from clm_jax import config as config_lib
from clm_jax.ckpt import params as params_lib
from clm_jax.config import schema
from clm_jax.data import records
from clm_jax.data import sources
from clm_jax.data import tokenizer as tokenizer_lib
from clm_jax.model import decoder as model_lib
from clm_jax.parallel import sharding

# Export shards at most this large (HF's own default for big models is 5 GB).
MAX_SHARD_BYTES = 2 * 2**30

INDEX_FILE = 'model.safetensors.index.json'

# Tensors some HF checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)

# safetensors' dtype names.
_DTYPE_NAMES = {'float32': 'F32', 'float16': 'F16', 'bfloat16': 'BF16'}

# config.json and the index are KBs (a 70B model's index: ~100 KB); a bigger
# one is not what it claims to be, and is not read into memory.
_MAX_JSON_BYTES = 64 * 2**20

# config.json keys that must be positive integers: required, and optional
# (absent or null = the default below).
_SIZES = (
  'vocab_size',
  'hidden_size',
  'num_hidden_layers',
  'num_attention_heads',
  'intermediate_size',
)
_OPTIONAL_SIZES = ('num_key_value_heads', 'max_position_embeddings', 'head_dim')


class HFError(ValueError):
  """A Hugging Face checkpoint clm_jax cannot read; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class Key:
  """One parameter: its HF name ('{i}' = layer), its path in params, its transform."""

  hf: str
  ours: str
  transform: str

  @property
  def stacked(self) -> bool:
    return '{i}' in self.hf

  @property
  def path(self) -> tuple[str, ...]:
    return tuple(self.ours.split('/'))


# In HF's tensor order (export writes them in this order).
KEYS = (
  Key('model.embed_tokens.weight', 'embed', 'copy'),
  Key('model.layers.{i}.self_attn.q_proj.weight', 'blocks/attn/wq', 'heads_out'),
  Key('model.layers.{i}.self_attn.k_proj.weight', 'blocks/attn/wk', 'heads_out'),
  Key('model.layers.{i}.self_attn.v_proj.weight', 'blocks/attn/wv', 'heads_out'),
  Key('model.layers.{i}.self_attn.o_proj.weight', 'blocks/attn/wo', 'heads_in'),
  Key('model.layers.{i}.mlp.gate_proj.weight', 'blocks/mlp/w_gate', 'transpose'),
  Key('model.layers.{i}.mlp.up_proj.weight', 'blocks/mlp/w_up', 'transpose'),
  Key('model.layers.{i}.mlp.down_proj.weight', 'blocks/mlp/w_down', 'transpose'),
  Key('model.layers.{i}.input_layernorm.weight', 'blocks/attn_norm/scale', 'copy'),
  Key('model.layers.{i}.post_attention_layernorm.weight', 'blocks/mlp_norm/scale', 'copy'),
  Key('model.norm.weight', 'final_norm/scale', 'copy'),
  Key('lm_head.weight', 'lm_head', 'transpose'),
)

# name -> (HF -> ours, ours -> HF), each f(array, head_dim); one layer's
# tensor, NumPy or JAX alike. HF matrices are [out, in], ours [in, out].
TRANSFORMS = {
  'copy': (lambda x, h: x, lambda x, h: x),
  'transpose': (lambda x, h: x.T, lambda x, h: x.T),
  # q/k/v: [heads * H, D] <-> [D, heads, H]
  'heads_out': (
    lambda x, h: x.reshape(-1, h, x.shape[1]).transpose(2, 0, 1),
    lambda x, h: x.reshape(x.shape[0], -1).T,
  ),
  # o: [D, N * H] <-> [N, H, D]
  'heads_in': (
    lambda x, h: x.T.reshape(-1, h, x.shape[0]),
    lambda x, h: x.reshape(-1, x.shape[-1]).T,
  ),
}

# HF config keys whose other values change the network; clm_jax implements these.
_FIXED = {
  'model_type': 'llama',
  'hidden_act': 'silu',
  'tie_word_embeddings': False,
  'attention_bias': False,
  'mlp_bias': False,
}


def _read_json(path: pathlib.Path) -> dict:
  """A JSON object from a file of a model directory; anything else is one HFError."""
  try:
    # Symlinks are followed: Hugging Face's cache links every file to a blob.
    with sources.open_regular(path, follow_symlinks=True) as f:
      data = f.read(_MAX_JSON_BYTES + 1)
  except OSError as e:
    raise HFError(f'{path}: cannot be read ({e}).') from e
  if len(data) > _MAX_JSON_BYTES:
    raise HFError(f'{path}: over {_MAX_JSON_BYTES // 2**20} MiB, not a model config or index.')
  try:
    value = json.loads(data)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise HFError(f'{path}: not valid JSON ({e}).') from e
  if not isinstance(value, dict):
    raise HFError(f'{path}: holds a JSON {type(value).__name__}, not a JSON object.')
  return value


def _positive(path, key, value, kind=int):
  """value, if a positive int (kind=int) or finite positive number (kind=float)."""
  # bool is an int to Python, never a size or an epsilon to config.json.
  ok = not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
  try:
    # JSON's NaN and Infinity load as floats; an int past float's range overflows.
    ok = ok and math.isfinite(value) and value > 0
  except OverflowError:
    ok = False
  if not ok:
    noun = 'integer' if kind is int else 'number'
    raise HFError(f'{path}: {key}={reprlib.repr(value)} must be a positive {noun}.')
  return kind(value)


def _default(hf: dict, key: str, default):
  # null means "the default" in HF configs; 0 does not, and is checked as given.
  return default if hf.get(key) is None else hf[key]


def read_hf_config(directory) -> dict:
  """The `config.model` keys of a HF Llama directory's config.json.

  Reads rope_theta from the top level (transformers 4) or from
  `rope_parameters` (transformers 5).

  Returns:
    {vocab_size, d_model, num_layers, num_heads, num_kv_heads, mlp_dim,
    rope_theta, norm_eps, max_seq_len}, as `ModelConfig` takes them.

  Raises:
    FileNotFoundError: No config.json.
    HFError: config.json is not a JSON object, a key is missing or not a
      positive number, sizes disagree, or a key asks for what clm_jax does
      not implement (rope scaling, tied embeddings, biases, another
      architecture).
  """
  path = pathlib.Path(directory) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: not a Hugging Face model directory.')
  hf = _read_json(path)
  for key in _SIZES:
    if hf.get(key) is None:
      raise HFError(f'{path}: {key} is missing.')
  # Each size once, checked: a zero or negative one would divide by zero or
  # make arrays of negative shape further on.
  sizes = {key: _positive(path, key, hf[key]) for key in _SIZES}
  sizes |= {
    key: _positive(path, key, hf[key]) for key in _OPTIONAL_SIZES if hf.get(key) is not None
  }

  for key, want in _FIXED.items():
    if key in hf and hf[key] != want:
      raise HFError(f'{path}: {key}={hf[key]!r} is not supported (clm_jax implements {want!r}).')
  # transformers 4 writes rope_theta + rope_scaling, 5 writes rope_parameters.
  for key in ('rope_scaling', 'rope_parameters'):
    rope = hf.get(key) or {}
    if (
      not isinstance(rope, dict) or rope.get('rope_type', rope.get('type', 'default')) != 'default'
    ):
      raise HFError(
        f'{path}: {key}={rope!r} is not supported: clm_jax implements plain RoPE '
        "(rope_type 'default') only."
      )
  rope_theta = _default(
    hf.get('rope_parameters') or {}, 'rope_theta', _default(hf, 'rope_theta', 10000.0)
  )
  heads = sizes['num_attention_heads']
  d_model = sizes['hidden_size']
  out = {
    'vocab_size': sizes['vocab_size'],
    'd_model': d_model,
    'num_layers': sizes['num_hidden_layers'],
    'num_heads': heads,
    'num_kv_heads': sizes.get('num_key_value_heads', heads),
    'mlp_dim': sizes['intermediate_size'],
    'rope_theta': _positive(path, 'rope_theta', rope_theta, float),
    'norm_eps': _positive(path, 'rms_norm_eps', _default(hf, 'rms_norm_eps', 1e-6), float),
    'max_seq_len': sizes.get('max_position_embeddings', 2048),
  }
  if d_model % heads or sizes.get('head_dim', d_model // heads) != d_model // heads:
    raise HFError(
      f'{path}: head_dim={hf.get("head_dim")} with hidden_size={d_model} and '
      f'num_attention_heads={heads}: clm_jax needs head_dim = hidden_size / num_attention_heads.'
    )
  if heads % out['num_kv_heads']:
    raise HFError(
      f'{path}: num_attention_heads={heads} is not divisible by '
      f'num_key_value_heads={out["num_kv_heads"]}.'
    )
  return out


@contextlib.contextmanager
def _open_safetensors(file: pathlib.Path, tensor: str = ''):
  """safetensors.safe_open of a regular file; whatever it cannot read, one HFError."""
  what = f'{file}: {tensor}: ' if tensor else f'{file}: '
  try:
    # Not a FIFO or device (opening one would block, or map a device).
    if not stat.S_ISREG(file.stat().st_mode):
      raise HFError(f'{what}not a regular file.')
    with safetensors.safe_open(file, framework='numpy') as f:
      yield f
  except (safetensors.SafetensorError, OSError) as e:
    raise HFError(f'{what}cannot be read as safetensors: {e}.') from e


def _tensor_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """HF tensor name -> the safetensors file holding it."""
  index = directory / INDEX_FILE
  if index.exists():
    weight_map = _read_json(index).get('weight_map')
    if not isinstance(weight_map, dict) or not all(
      isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()
    ):
      raise HFError(
        f'{index}: weight_map must map tensor names to file names; got {reprlib.repr(weight_map)}.'
      )
    for name, file in weight_map.items():
      # By name, not by resolving symlinks: Hugging Face's cache links each
      # file of the directory to a blob outside it, and that is fine.
      if not records.is_relative_name(file):
        raise HFError(f'{index}: weight_map puts {name} in {file!r}, outside {directory}: refused.')
    out = {name: directory / file for name, file in weight_map.items()}
    for file in sorted(set(out.values())):
      if not file.exists():
        raise FileNotFoundError(f'{index} names {file.name}, which does not exist.')
    return out
  files = sorted(directory.glob('*.safetensors'))
  if not files:
    raise FileNotFoundError(
      f'{directory} has no *.safetensors file (nor {INDEX_FILE}); clm_jax reads safetensors '
      'only: save with save_pretrained(..., safe_serialization=True).'
    )
  out = {}
  for file in files:
    with _open_safetensors(file) as f:
      out.update(dict.fromkeys(f.keys(), file))
  return out


def _check_names(directory, files: dict, num_layers: int) -> None:
  want = {name for name, _, _ in _entries(num_layers)}
  got = {name for name in files if not name.endswith(_IGNORED_SUFFIXES)}
  missing, extra = sorted(want - got), sorted(got - want)
  if missing:
    raise HFError(f'{directory}: no tensor {", ".join(missing[:5])} in its safetensors files.')
  if extra:
    raise HFError(
      f'{directory}: tensors {", ".join(extra[:5])} ({files[extra[0]].name}) are not part of '
      'a Llama model clm_jax implements (biases? another architecture?).'
    )


def _entries(num_layers: int) -> list[tuple[str, Key, int | None]]:
  """(HF name, key, layer or None) of every tensor, in HF's order."""
  out = []
  layer_keys = [k for k in KEYS if k.stacked]
  for key in KEYS:
    if not key.stacked:
      out.append((key.hf, key, None))
    elif key is layer_keys[0]:
      out += [(k.hf.format(i=i), k, i) for i in range(num_layers) for k in layer_keys]
  return out


def _read(file: pathlib.Path, name: str) -> np.ndarray:
  # A fresh safe_open per tensor: its memory map, and the page cache mapped
  # into this process, go away with it instead of growing to the file's size.
  with _open_safetensors(file, name) as f:
    return f.get_tensor(name)


def _get(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def _set(tree, path, value):
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


@functools.cache
def _zeros_fn(shape, dtype, out_sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=out_sharding)


@functools.cache
def _set_layer_fn(out_sharding):
  # Donated: the stacked array is updated in place, never held twice.
  return jax.jit(
    lambda stacked, layer, i: stacked.at[i].set(layer),
    out_shardings=out_sharding,
    donate_argnums=0,
  )


def _layer_sharding(stacked: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """One layer's sharding: the stacked one without its leading `layers` axis."""
  if isinstance(stacked, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(stacked.mesh, jax.sharding.PartitionSpec(*stacked.spec[1:]))
  return stacked


def load_hf(directory, mesh=None, dtype: str | None = None, *, progress: bool = True):
  """Reads a HF Llama directory (config.json + safetensors) onto devices.

  Args:
    directory: The HF model directory: model.safetensors, or shards with
      model.safetensors.index.json.
    mesh: Place each parameter in the sharding `sharding.RULES` gives it on
      this mesh; None = on the default device.
    dtype: Params dtype ('float32', 'bfloat16', 'float16'); None = the
      dtype the files store.
    progress: Show a progress bar.

  Returns:
    (ModelConfig, params): the config computes in the params' dtype, with
    no rematerialisation (the settings for inference).
  """
  if dtype is not None and dtype not in _DTYPE_NAMES:
    raise ValueError(f'dtype={dtype!r} is not one of {sorted(_DTYPE_NAMES)}.')
  directory = pathlib.Path(directory)
  arch = read_hf_config(directory)
  files = _tensor_files(directory)
  _check_names(directory, files, arch['num_layers'])
  if dtype is None:
    embed = KEYS[0].hf
    with _open_safetensors(files[embed], embed) as f:
      stored = f.get_slice(embed).get_dtype()
    names = {v: k for k, v in _DTYPE_NAMES.items()}
    if stored not in names:
      raise HFError(f'{files[embed]}: {embed} is {stored}; clm_jax reads {sorted(names)}.')
    dtype = names[stored]
  cfg = config_lib.ModelConfig(**arch, param_dtype=dtype, dtype=dtype, remat='none')
  _, abstract, axes = model_lib.abstract(cfg)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = sharding.param_shardings(axes, abstract, mesh)

  params = {}
  entries = _entries(cfg.num_layers)
  bar = tqdm.tqdm(entries, desc=f'Reading {directory.name}', unit='tensor', disable=not progress)
  for name, key, layer in bar:
    want, target = _get(abstract, key.path), _get(shardings, key.path)
    x = TRANSFORMS[key.transform][0](_read(files[name], name), cfg.head_dim)
    want_shape = want.shape[1:] if key.stacked else want.shape
    if x.shape != want_shape:
      raise HFError(
        f'{files[name]}: {name} reads as {x.shape} for {key.ours} but config.json makes it '
        f'{want_shape}.'
      )
    # One contiguous copy in the params dtype: the transposes above are views.
    x = np.ascontiguousarray(x, dtype=jnp.dtype(dtype))
    if not key.stacked:
      _set(params, key.path, jax.device_put(x, target))
    else:
      if layer == 0:
        _set(params, key.path, _zeros_fn(want.shape, jnp.dtype(dtype), target)())
      layer_x = jax.device_put(x, _layer_sharding(target))
      _set(params, key.path, _set_layer_fn(target)(_get(params, key.path), layer_x, layer))
    del x
  return cfg, params


@functools.partial(jax.jit, static_argnames=('transform', 'head_dim', 'dtype'))
def _hf_tensor(x, layer, *, transform, head_dim, dtype):
  if layer is not None:
    x = x[layer]
  return TRANSFORMS[transform][1](x, head_dim).astype(dtype)


def hf_config(cfg: config_lib.ModelConfig, dtype: str, bos_id: int = 1, eos_id: int = 2) -> dict:
  """The config.json of a LlamaForCausalLM equal to clm_jax's model `cfg`."""
  return {
    'architectures': ['LlamaForCausalLM'],
    'model_type': 'llama',
    'vocab_size': cfg.vocab_size,
    'hidden_size': cfg.d_model,
    'intermediate_size': cfg.mlp_dim,
    'num_hidden_layers': cfg.num_layers,
    'num_attention_heads': cfg.num_heads,
    'num_key_value_heads': cfg.num_kv_heads,
    'head_dim': cfg.head_dim,
    'hidden_act': 'silu',
    'max_position_embeddings': cfg.max_seq_len,
    'rms_norm_eps': cfg.norm_eps,
    # transformers 4 reads rope_theta, 5 reads rope_parameters; both agree.
    'rope_theta': cfg.rope_theta,
    'rope_scaling': None,
    'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
    'attention_bias': False,
    'attention_dropout': 0.0,
    'mlp_bias': False,
    'tie_word_embeddings': False,
    'initializer_range': cfg.init_std,
    'bos_token_id': bos_id,
    'eos_token_id': eos_id,
    'use_cache': True,
    'torch_dtype': dtype,  # transformers 4's name
    'dtype': dtype,  # transformers 5's
  }


def _shard_plan(sizes: list[int], max_bytes: int) -> list[list[int]]:
  """Consecutive entries grouped into shards of at most max_bytes (or one big tensor)."""
  shards, current, used = [], [], 0
  for i, size in enumerate(sizes):
    if current and used + size > max_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(i)
    used += size
  return shards + [current] if current else shards


def _header(items: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
  """A safetensors header for (name, dtype, shape) stored in this order, padded to 8 bytes."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, dtype, shape in items:
    size = math.prod(shape) * jnp.dtype(dtype).itemsize
    header[name] = {
      'dtype': _DTYPE_NAMES[dtype],
      'shape': list(shape),
      'data_offsets': [offset, offset + size],
    }
    offset += size
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  return len(text).to_bytes(8, 'little') + text


def save_hf(
  params,
  model_config: config_lib.ModelConfig,
  out_dir,
  tokenizer_path=None,
  dtype: str = 'bfloat16',
  *,
  max_shard_bytes: int = MAX_SHARD_BYTES,
  progress: bool = True,
) -> dict:
  """Writes params as a HF LlamaForCausalLM directory, one tensor at a time.

  Args:
    params: clm_jax params (blocks in plain layer order), on any mesh whose
      arrays this process can read whole (a single-process run).
    model_config: Their ModelConfig.
    out_dir: The directory; created, and must hold no file yet.
    tokenizer_path: A sentencepiece .model copied as tokenizer.model, with a
      tokenizer_config.json; None = no tokenizer.
    dtype: Of the written tensors: 'bfloat16', 'float16' or 'float32'.
    max_shard_bytes: Files of at most this size (a larger tensor gets its
      own); more than one is indexed by model.safetensors.index.json.
    progress: Show a progress bar.

  Returns:
    {'files': the safetensors file names, 'bytes': their tensors' size}.
  """
  tokenizer = None if tokenizer_path is None else pathlib.Path(tokenizer_path).read_bytes()
  return _write_hf(params, model_config, out_dir, tokenizer, dtype, max_shard_bytes, progress)


def _write_hf(params, cfg, out_dir, tokenizer: bytes | None, dtype, max_shard_bytes, progress):
  if dtype not in _DTYPE_NAMES:
    raise ValueError(f'dtype={dtype!r} is not one of {sorted(_DTYPE_NAMES)}.')
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f'{out_dir} is not empty; choose a new directory.')
  out_dir.mkdir(parents=True, exist_ok=True)
  h = cfg.head_dim
  entries = _entries(cfg.num_layers)
  shapes = []
  for _, key, layer in entries:
    x = _get(params, key.path)
    layer_x = jax.ShapeDtypeStruct(x.shape[1:] if layer is not None else x.shape, x.dtype)
    shapes.append(jax.eval_shape(lambda x, t=key.transform: TRANSFORMS[t][1](x, h), layer_x).shape)
  sizes = [math.prod(s) * jnp.dtype(dtype).itemsize for s in shapes]
  plan = _shard_plan(sizes, max_shard_bytes)
  names = (
    ['model.safetensors']
    if len(plan) == 1
    else [f'model-{i + 1:05d}-of-{len(plan):05d}.safetensors' for i in range(len(plan))]
  )
  bar = tqdm.tqdm(
    total=sum(sizes),
    desc=f'Writing {out_dir.name}',
    unit='B',
    unit_scale=True,
    disable=not progress,
  )
  weight_map = {}
  for file_name, shard in zip(names, plan, strict=True):
    # Written under a temporary name: a file that exists is whole.
    tmp = out_dir / f'.{file_name}.tmp'
    with tmp.open('wb') as f:
      f.write(_header([(entries[i][0], dtype, shapes[i]) for i in shard]))
      for i in shard:
        name, key, layer = entries[i]
        x = _hf_tensor(
          _get(params, key.path), layer, transform=key.transform, head_dim=h, dtype=dtype
        )
        x = np.ascontiguousarray(jax.device_get(x))
        f.write(x.reshape(-1).view(np.uint8).data)
        weight_map[name] = file_name
        bar.update(x.nbytes)
        del x
    os.replace(tmp, out_dir / file_name)
  bar.close()
  if len(plan) > 1:
    index = {'metadata': {'total_size': sum(sizes)}, 'weight_map': weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + '\n')
  bos_id, eos_id = 1, 2  # LLaMA's, and clm_jax's tokenizers'
  if tokenizer:
    bos_id, eos_id = _write_tokenizer(out_dir, tokenizer, cfg.max_seq_len)
  config = hf_config(cfg, dtype, bos_id, eos_id)
  (out_dir / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
  return {'files': names, 'bytes': sum(sizes)}


def _write_tokenizer(out_dir: pathlib.Path, model: bytes, max_len: int) -> tuple[int, int]:
  """Writes tokenizer.model and a LlamaTokenizer tokenizer_config.json; returns (BOS, EOS)."""
  (out_dir / tokenizer_lib.TOKENIZER_FILE).write_bytes(model)
  tok = tokenizer_lib.from_bytes(model, str(out_dir / tokenizer_lib.TOKENIZER_FILE))
  normalizer = sentencepiece_model_pb2.ModelProto.FromString(model).normalizer_spec
  piece = tok.id_to_piece
  config = {
    'tokenizer_class': 'LlamaTokenizer',
    'bos_token': piece(tok.bos_id),
    'eos_token': piece(tok.eos_id),
    'unk_token': piece(tok.unk_id),
    'pad_token': piece(tok.pad_id),
    'add_bos_token': True,
    'add_eos_token': False,
    'model_max_length': max_len,
    # LLaMA's tokenizer prepends ' ' to a text, clm_jax's (lossless) does not;
    # HF's LlamaTokenizer prepends it unless told.
    'add_prefix_space': normalizer.add_dummy_prefix,
    'legacy': False,
  }
  (out_dir / 'tokenizer_config.json').write_text(json.dumps(config, indent=2) + '\n')
  return tok.bos_id, tok.eos_id


def convert_from_hf(hf_dir, output, *, dtype: str | None = None, mesh=None) -> dict:
  """Writes a HF Llama directory as a clm_jax params-only checkpoint.

  The output (output/0/{params,config[,tokenizer]}) is what `convert
  --to_params` writes, read by `params_lib.load_params` and `clm_jax.load`:
  a start for fine-tuning. Its config is clm_jax/config/schema.py with the HF model's
  `model` keys.

  Args:
    hf_dir: The HF model directory; its tokenizer.model, if any, goes along.
    output: The checkpoint directory; must not exist yet.
    dtype: Of the written params; None = as the HF files store them.
    mesh: Where the params are held while written (see `load_hf`).

  Returns:
    {'output', 'bytes', 'config': the ModelConfig}.
  """
  output = pathlib.Path(output).absolute()
  if output.exists():  # Before reading anything.
    raise FileExistsError(f'--output={output} exists; choose a new directory.')
  cfg, params = load_hf(hf_dir, mesh, dtype)
  c = schema.get_config()
  c.model.update(read_hf_config(hf_dir))
  tokenizer = pathlib.Path(hf_dir) / tokenizer_lib.TOKENIZER_FILE
  tokenizer = tokenizer.read_bytes() if tokenizer.is_file() else None
  size = params_lib.save_params(output, params, c.to_dict(), tokenizer)
  return {'output': str(output), 'bytes': size, 'config': cfg}


def convert_to_hf(
  src, hf_dir, *, dtype: str = 'bfloat16', step: int | None = None, mesh=None, progress=True
) -> dict:
  """Writes a clm_jax checkpoint as a HF LlamaForCausalLM directory.

  Args:
    src: A run directory (its latest checkpoint, or `step`) or a params-only
      checkpoint (`convert --to_params`, `convert_from_hf`).
    hf_dir: The output directory; created, and must hold no file yet.
    dtype: Of the written tensors.
    step: With a run directory: which step; None = the latest.
    mesh: Where the params are held while written; None = one device.
    progress: Show a progress bar.

  Returns:
    save_hf's answer, and 'step' (None for a params-only checkpoint).
  """
  step, params, config, tokenizer = params_lib.read(src, step=step, mesh=mesh)
  cfg = config_lib.ModelConfig.from_config(ml_collections.ConfigDict(config['model']))
  out = _write_hf(params, cfg, hf_dir, tokenizer, dtype, MAX_SHARD_BYTES, progress)
  return {**out, 'step': step}
