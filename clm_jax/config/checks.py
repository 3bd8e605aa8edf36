"""Config validation and the typed views the library builds from it.

`validate` checks a whole ConfigDict against the schema in clm_jax/config/schema.py
and against the devices it will run on, before any device work, and raises
one ConfigError listing every problem by its key.
"""

import difflib
import math

import ml_collections

from clm_jax.config import schema


class ConfigError(ValueError):
  """An invalid configuration; the message names the offending key(s)."""


def mesh_shape(c_mesh: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, tensor, pipeline) with a -1 entry filled from the device count."""
  sizes = {k: c_mesh[k] for k in ('data', 'tensor', 'pipeline')}
  fill = [k for k, v in sizes.items() if v == -1]
  bad = [k for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)]
  if bad or len(fill) > 1:
    raise ConfigError(
      f'mesh.{"/".join(bad or fill)}: sizes must be positive integers, '
      f'with at most one -1 (fill); got {sizes}'
    )
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % fixed:
      raise ConfigError(
        f'mesh.{fill[0]}=-1 cannot fill {num_devices} devices: the other axes '
        f'multiply to {fixed}, which does not divide {num_devices}'
      )
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
      f'mesh.data x mesh.tensor x mesh.pipeline = {fixed} ({sizes}) but '
      f'{num_devices} devices are available; set one of them to -1 to fill'
    )
  return sizes['data'], sizes['tensor'], sizes['pipeline']


def unknown_keys(keys) -> list[str]:
  """'KEY: unknown config key (did you mean CLOSEST?)' for each of `keys` not in the schema.

  `keys` are dotted leaf paths, as `--config.train.steps=3` names `train.steps`.
  """
  declared = schema.flatten(schema.get_config())
  errors = []
  for key in keys:
    if key not in declared:
      close = difflib.get_close_matches(key, declared, n=1)
      hint = f' (did you mean {close[0]}?)' if close else ''
      errors.append(f'{key}: unknown config key{hint}')
  return errors


def check_schema(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming every unknown, missing or mistyped key of `c`.

  What `validate` checks first; this alone needs no device count.
  """
  errors: list[str] = []
  _check_schema(c, errors)
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))


def _check_schema(c, errors):
  declared = schema.flatten(schema.get_config())
  given = schema.flatten(c)
  errors += unknown_keys(sorted(set(given) - set(declared)))
  for key in sorted(set(declared) - set(given)):
    errors.append(f'{key}: missing config key')
  for key in sorted(set(declared) & set(given)):
    want, got = type(declared[key]), type(given[key])
    if want is float and got is int:
      continue
    if not isinstance(given[key], want):
      errors.append(f'{key}: expected {want.__name__}, got {given[key]!r}')


def _check_values(c, num_devices, errors):
  m, t, o = c.model, c.train, c.optim

  def positive(section, *keys):
    for key in keys:
      if not c[section][key] > 0:
        errors.append(f'{section}.{key}: must be > 0, got {c[section][key]}')

  positive('model', 'vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads')
  positive('model', 'mlp_dim', 'rope_theta', 'norm_eps', 'max_seq_len', 'init_std')
  positive('model', 'max_segments')
  positive('train', 'steps', 'seq_len', 'global_batch_size', 'microbatches', 'log_every')
  positive('optim', 'peak_lr', 'eps')
  positive('checkpoint', 'every', 'keep')
  for section, key in [
    ('train', 'eval_every'),
    ('train', 'eval_batches'),
    ('train', 'peak_tflops'),
    ('optim', 'warmup_steps'),
    ('optim', 'decay_steps'),
    ('optim', 'weight_decay'),
    ('optim', 'clip_norm'),
    ('data', 'streams'),
    ('data', 'workers'),
    ('data', 'read_threads'),
    ('data', 'prefetch'),
    ('checkpoint', 'keep_period'),
    ('plan', 'devices'),
    ('plan', 'tokens'),
    ('plan', 'target_days'),
    ('plan', 'claimed_gpu_hours'),
    ('train', 'max_nonfinite'),
    ('train', 'code_eval_every'),
    ('train', 'code_eval_problems'),
    ('train', 'code_eval_max_new_tokens'),
  ]:
    if c[section][key] < 0:
      errors.append(f'{section}.{key}: must be >= 0, got {c[section][key]}')
  for key in ('b1', 'b2'):
    if not 0 <= o[key] < 1:
      errors.append(f'optim.{key}: must be in [0, 1), got {o[key]}')
  if not 0 < c.plan.mfu <= 1:
    errors.append(f'plan.mfu: must be in (0, 1], got {c.plan.mfu}')
  if not 0 <= o.end_lr_ratio <= 1:
    errors.append(f'optim.end_lr_ratio: must be in [0, 1], got {o.end_lr_ratio}')
  if not 0 <= c.data.heldout_fraction < 1:
    errors.append(f'data.heldout_fraction: must be in [0, 1), got {c.data.heldout_fraction}')
  for key, allowed in [
    ('param_dtype', schema.DTYPES),
    ('dtype', schema.DTYPES),
    ('remat', schema.REMAT),
    ('attention', schema.ATTENTION),
  ]:
    if m[key] not in allowed:
      errors.append(f'model.{key}: {m[key]!r} is not one of {allowed}')
  if c.data.source not in schema.SOURCES:
    errors.append(f'data.source: {c.data.source!r} is not one of {schema.SOURCES}')
  elif c.data.source != 'stdlib' and not c.data.path:
    errors.append(f'data.path: data.source={c.data.source!r} needs a path')
  tasks = [task for task in t.code_eval_tasks.split(',') if task]
  if unknown := sorted(set(tasks) - set(schema.CODE_EVAL_TASKS)):
    errors.append(f'train.code_eval_tasks: {unknown} are not among {schema.CODE_EVAL_TASKS}')
  if c.data.source == 'instruct' and (c.data.fim_rate or c.data.mixture):
    errors.append(
      "data.source='instruct': data.fim_rate and data.mixture do not apply to dialogs; "
      'set them to 0 and ""'
    )
  for key in ('fim_rate', 'fim_spm_rate'):
    if not 0 <= c.data[key] <= 1:
      errors.append(f'data.{key}: must be in [0, 1], got {c.data[key]}')
  try:
    schema.parse_mixture(c.data.mixture)
  except ValueError as e:
    errors.append(str(e))
  if errors:
    return  # The checks below divide by these values.

  errors += check_model(m, t.seq_len)
  errors += check_attention(m.attention, m.dtype, m.max_segments, t.seq_len)
  if t.loss_chunk_len < 0 or (t.loss_chunk_len and t.seq_len % t.loss_chunk_len):
    errors.append(
      f'train.loss_chunk_len={t.loss_chunk_len} must be 0 or divide train.seq_len={t.seq_len}'
    )
  streams = stream_count(c.data, t.global_batch_size)
  if t.global_batch_size % streams:
    errors.append(
      f'data.streams={c.data.streams} must divide train.global_batch_size='
      f'{t.global_batch_size}: every stream gives each batch the same number of rows'
    )
  if t.global_batch_size % t.microbatches:
    errors.append(
      f'train.global_batch_size={t.global_batch_size} is not divisible by '
      f'train.microbatches={t.microbatches}'
    )
  try:
    data, tensor, pipeline = mesh_shape(c.mesh, num_devices)
  except ConfigError as e:
    errors.append(str(e))
    return
  errors += check_layout(
    num_layers=m.num_layers,
    global_batch_size=t.global_batch_size,
    microbatches=t.microbatches,
    pipeline_microbatches=c.mesh.pipeline_microbatches,
    data=data,
    pipeline=pipeline,
    virtual_stages=c.mesh.virtual_stages,
  )
  for key in ('num_heads', 'mlp_dim', 'vocab_size'):
    if m[key] % tensor:
      errors.append(f'model.{key}={m[key]} is not divisible by mesh.tensor={tensor}')
  # kv heads that do not divide over 'tensor' are replicated (sharding.py), not an error.


def check_model(m, seq_len: int) -> list[str]:
  """The model section's shape rules (sizes already known positive)."""
  errors = []
  if m.num_heads % m.num_kv_heads:
    errors.append(
      f'model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}'
    )
  if m.d_model % m.num_heads or (m.d_model // m.num_heads) % 2:
    errors.append(
      f'model.d_model={m.d_model} / model.num_heads={m.num_heads} must be an even '
      'integer head_dim (rotary embeddings rotate pairs)'
    )
  if seq_len > m.max_seq_len:
    errors.append(f'train.seq_len={seq_len} exceeds model.max_seq_len={m.max_seq_len}')
  return errors


def check_attention(attention: str, dtype: str, max_segments: int, seq_len: int) -> list[str]:
  """What the attention kernel needs; the planner offers 'cudnn' only where this is empty."""
  errors = []
  if attention != 'cudnn':
    return errors
  if max_segments > seq_len:
    errors.append(
      f'model.max_segments={max_segments} exceeds train.seq_len={seq_len}: a row holds '
      'at most one document per token, and cuDNN attention is compiled for max_segments'
    )
  if dtype not in ('bfloat16', 'float16'):
    errors.append(
      f"model.attention='cudnn' needs model.dtype 'bfloat16' or 'float16' (cuDNN flash "
      f'attention), got {dtype!r}'
    )
  return errors


def check_layout(
  *,
  num_layers: int,
  global_batch_size: int,
  microbatches: int,
  pipeline_microbatches: int,
  data: int,
  pipeline: int,
  virtual_stages: int,
) -> list[str]:
  """How a step is laid out over the mesh; the planner's candidate layouts pass this too."""
  v = virtual_stages
  if v < 1:
    return [f'mesh.virtual_stages: must be >= 1, got {v}']
  errors = []
  if v > 1 and pipeline == 1:
    errors.append(f'mesh.virtual_stages={v} needs mesh.pipeline > 1')
  if num_layers % (pipeline * v):
    errors.append(
      f'model.num_layers={num_layers} is not divisible by mesh.pipeline={pipeline} x '
      f'mesh.virtual_stages={v} = {pipeline * v} layer chunks'
    )
  per_pass = pipeline_microbatches or microbatches
  if pipeline_microbatches < 0 or microbatches % per_pass:
    errors.append(
      f'mesh.pipeline_microbatches={pipeline_microbatches} must be 0 or divide '
      f'train.microbatches={microbatches}'
    )
  elif pipeline > 1 and per_pass < pipeline:
    errors.append(
      f'{per_pass} micro-batches per pipeline pass (train.microbatches, '
      f'mesh.pipeline_microbatches) are fewer than mesh.pipeline={pipeline}: stages would '
      'idle; use at least one micro-batch per stage'
    )
  elif v > 1 and per_pass % pipeline:
    errors.append(
      f'{per_pass} micro-batches per pipeline pass (train.microbatches, '
      f'mesh.pipeline_microbatches) are not a multiple of mesh.pipeline={pipeline}, which '
      'the circular schedule (mesh.virtual_stages > 1) needs'
    )
  micro = global_batch_size // microbatches
  if micro % data:
    errors.append(
      f'train.global_batch_size={global_batch_size} / train.microbatches='
      f'{microbatches} = {micro} rows per micro-batch, not divisible by mesh.data={data}'
    )
  return errors


def stream_count(c_data: ml_collections.ConfigDict, batch_size: int) -> int:
  """Packed streams a batch of `batch_size` rows is drawn from: at most one per row."""
  return min(max(c_data.streams, 1), batch_size)


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError naming every inconsistent or unknown key of `c`."""
  errors: list[str] = []
  _check_schema(c, errors)
  if not errors:
    _check_values(c, num_devices, errors)
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))
