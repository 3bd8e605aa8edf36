"""What runs between steps: each hook decides when it is due and what it logs.

The loop reads a step's metrics before its first due hook runs, so hooks (and
checkpoints) see them; what a hook returns is logged. The CLI adds hooks from
layers above training (code eval, the planner's memory estimate).
"""

import jax
import numpy as np

from clm_jax.parallel import sharding


class Hook:
  """A no-op; subclasses override what they need."""

  def start(self, run) -> None:
    """Once, after the state is initialised or restored."""

  def on_metrics(self, step: int, metrics: dict[str, float], run) -> None:
    """Every step's metrics, in order, once read from the device."""

  def due(self, step: int, run) -> bool:
    """Whether to run after `step`; called on every process at every step."""
    del step, run
    return False

  def __call__(self, step: int, run) -> dict[str, float] | None:
    """Does the work; returns metrics to log, or None."""
    del step, run
    return None


class Log(Hook):
  """Metric lines: the window's summary every `train.log_every` steps, and the last step."""

  def on_metrics(self, step, metrics, run):
    run.meter.add(metrics)
    c_train = run.c.train
    if step == 1 or step % c_train.log_every == 0 or step == c_train.steps:
      run.last = run.meter.summary()
      run.writer.write(step, run.last)
      run.writer.progress(step, run.last)
    elif step == run.start_step + 1:  # A sign of life after a resume; the window goes on.
      run.writer.progress(step, {'loss': metrics['loss']})


def mean_loss(loss_sum_fn, batches, max_batches: int = 0) -> tuple[float, float, int]:
  """(mean loss per target token, target tokens, batches) of `loss_sum_fn` over `batches`.

  The one held-out loss of training's evaluation and `eval --task=perplexity`;
  `max_batches` 0 reads all.
  """
  total = count = 0.0
  done = 0
  for batch in batches:
    s, n = loss_sum_fn(batch)
    total, count, done = total + float(s), count + float(n), done + 1
    if done == max_batches:
      break
  return total / max(count, 1.0), count, done


class HeldoutEval(Hook):
  """Held-out loss every `train.eval_every` steps (0: only at the end) and at the last step."""

  def due(self, step, run):
    c_train = run.c.train
    if run.heldout_ds is None:
      return False
    return bool(c_train.eval_every and step % c_train.eval_every == 0) or step == c_train.steps

  def __call__(self, step, run):
    c_train = run.c.train
    it = iter(run.heldout_ds)
    try:
      loss, _, _ = mean_loss(
        lambda host: run.setup.eval_step(
          run.state.params, sharding.host_to_global(host, run.mesh, c_train.global_batch_size)
        ),
        it,
        c_train.eval_batches,
      )
    finally:
      it.close()
    out = {'eval_loss': loss, 'eval_perplexity': float(np.exp(loss))}
    run.writer.write(step, out)
    run.writer.progress(step, {'eval_loss': loss})
    run.meter.restart()  # Evaluation time is not step time.
    return out


class StopCheck(Hook):
  """A SIGTERM / SIGINT on any process stops every process after the same step."""

  def __init__(self, stop_request):
    self._stop = stop_request

  def due(self, step, run):
    return self._stop.requested(step)

  def __call__(self, step, run):
    run.stop_reason = self._stop.reason


class Save(Hook):
  """A checkpoint every `checkpoint.every` steps, at the last step, and when stopping."""

  def due(self, step, run):
    every = run.c.checkpoint.every
    return step % every == 0 or step == run.c.train.steps or run.stop_reason is not None

  def __call__(self, step, run):
    run.checkpointer.save(
      step,
      run.setup.to_checkpoint(run.state),
      run.train_iter,
      config=run.c.to_dict(),
      tokenizer_path=run.tokenizer.path,
      loop={'meter': run.meter.state()},
    )


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def check_finite(step: int, metrics: dict[str, float], max_nonfinite: int) -> None:
  """Raises NonFiniteError once `max_nonfinite` (> 0) steps in a row were skipped."""
  if metrics['nonfinite_in_a_row'] >= max_nonfinite > 0:
    raise NonFiniteError(
      f'step {step}: {int(metrics["nonfinite_in_a_row"])} steps in a row had a non-finite '
      f'loss or gradient (loss={metrics["loss"]}); their updates were skipped and the last '
      'checkpoint is intact. Lower optim.peak_lr or raise train.max_nonfinite.'
    )


def read_metrics(metrics) -> dict[str, float]:
  """A step's metrics as Python floats (waits for the step)."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}
