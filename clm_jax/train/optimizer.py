"""The optax chain and learning-rate schedule of a CodeLlama run.

clip -> AdamW (no decay on norm scales), warmup then cosine decay; a
non-finite gradient skips the update.
"""

import optax

# apply_if_finite lets a non-finite update through once this many have been
# skipped in a row; the training loop stops the run long before that.
_NEVER = 2**31 - 1


def make_schedule(c_optim, total_steps: int) -> optax.Schedule:
  """The learning rate by applied updates so far: warmup to peak_lr, then cosine decay.

  Update n (1-based; the loop's step n) trains at peak_lr * n / warmup_steps
  while warming up, as Megatron-LM counts, so the first update is not a no-op
  at lr 0 and step warmup_steps is the first at the peak; the cosine then
  reaches end_lr_ratio * peak_lr at step warmup_steps + decay_steps.
  """
  decay_steps = c_optim.decay_steps or max(total_steps - c_optim.warmup_steps, 1)
  by_step = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=c_optim.peak_lr,
    warmup_steps=c_optim.warmup_steps,
    decay_steps=c_optim.warmup_steps + decay_steps,
    end_value=c_optim.peak_lr * c_optim.end_lr_ratio,
  )
  # optax counts updates from 0; step n is update count n - 1.
  return lambda count: by_step(count + 1)


def make_optimizer(c_optim, schedule: optax.Schedule, decay_mask) -> optax.GradientTransformation:
  """The update rule; `schedule` is read at the number of applied (finite) updates."""
  clip = optax.clip_by_global_norm(c_optim.clip_norm) if c_optim.clip_norm else optax.identity()
  adamw = optax.adamw(
    learning_rate=schedule,
    b1=c_optim.b1,
    b2=c_optim.b2,
    eps=c_optim.eps,
    weight_decay=c_optim.weight_decay,
    mask=decay_mask,
  )
  return optax.apply_if_finite(optax.chain(clip, adamw), max_consecutive_errors=_NEVER)
