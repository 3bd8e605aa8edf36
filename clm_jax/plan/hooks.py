"""The planner's word at the start of a training run."""

import jax
from absl import logging

from clm_jax.plan import estimate
from clm_jax.train import hooks

_GIB = 2**30


class MemoryEstimate(hooks.Hook):
  """Logs the planner's bytes per device, and warns where they exceed the device's pool."""

  def start(self, run):
    c = run.c
    mem = estimate.memory(c, estimate.layout_of(c, jax.device_count()))
    logging.info(
      'memory per device, estimated (see `launch plan`): %.2f GiB = params %.2f + optimizer '
      '%.2f + gradients %.2f + activations %.2f + working set %.2f',
      mem.total / _GIB,
      mem.params / _GIB,
      mem.optimizer / _GIB,
      mem.gradients / _GIB,
      mem.saved_activations / _GIB,
      mem.working_set / _GIB,
    )
    limit = (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit')
    if limit and mem.total > limit:
      logging.warning(
        'the estimate exceeds the %.1f GiB this device gives XLA: expect out-of-memory; '
        '`python -m launch plan` lists layouts that fit',
        limit / _GIB,
      )
