"""`plan`: parameters, memory per device, FLOPs and time of a config, before launch."""

import json

from absl import flags

_DEVICES = flags.DEFINE_integer('devices', None, 'plan: devices of the run; default plan.devices.')
_DEVICE_TYPE = flags.DEFINE_string(
  'device_type', None, 'plan: a100-40gb | a100-80gb | h100-80gb | h200-141gb | b200-180gb.'
)
_MFU = flags.DEFINE_float('mfu', None, 'plan: MFU assumed for times; default plan.mfu.')
_TARGET_DAYS = flags.DEFINE_float('target_days', None, 'plan: wall-clock target in days.')
_TOKENS = flags.DEFINE_float('tokens', None, 'plan: training-token budget; default plan.tokens.')
_JSON = flags.DEFINE_bool('json', False, 'plan: print the plan as one JSON object.')
_XLA = flags.DEFINE_bool(
  'xla', False, 'plan: also compile the real train step on abstract arrays (CPU, no allocation).'
)
_SUGGEST = flags.DEFINE_integer('suggest', 5, 'plan: fitting layouts to list; 0 = none.')


def run_plan():
  from clm_jax.plan import estimate
  from clm_jax.plan import report as plan_report
  from clm_jax.plan import xla_memory

  c = flags.FLAGS.config
  p = c.plan
  devices = _DEVICES.value or p.devices or _mesh_devices(c)
  result = estimate.plan(
    c,
    devices,
    estimate.device_type(_DEVICE_TYPE.value or p.device_type),
    mfu=_MFU.value or p.mfu,
    tokens=_TOKENS.value or p.tokens,
    target_days=_TARGET_DAYS.value if _TARGET_DAYS.value is not None else p.target_days,
    claimed_gpu_hours=p.claimed_gpu_hours,
    search=_SUGGEST.value,
  )
  if _XLA.value:
    result['xla'] = xla_memory.measure_in_subprocess(c, devices)
  print(json.dumps(result, indent=1) if _JSON.value else plan_report.describe(result))


def _mesh_devices(c) -> int:
  """The mesh's size, or this machine's device count where an axis is -1 (fill)."""
  sizes = [c.mesh.data, c.mesh.tensor, c.mesh.pipeline]
  if -1 not in sizes:
    return sizes[0] * sizes[1] * sizes[2]
  import jax

  return jax.device_count()


COMMANDS = {'plan': run_plan}
