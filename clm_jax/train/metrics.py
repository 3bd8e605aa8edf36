"""Where training metrics go: stdout progress, metrics.jsonl and TensorBoard.

Only process 0 writes; on every other process the writer is silent. This is
the only module that touches tensorboardX.
"""

import json
import math
import pathlib
import sys
import time

import tensorboardX

# metrics.jsonl key -> TensorBoard tag.
TAGS = {
  'loss': 'train/loss',
  'lr': 'train/lr',
  'grad_norm': 'train/grad_norm',
  'target_tokens': 'train/target_tokens',
  'nonfinite_total': 'train/nonfinite_total',
  'eval_loss': 'eval/loss',
  'eval_perplexity': 'eval/perplexity',
  'humaneval_pass@1': 'eval/humaneval_pass_at_1',
  'mbpp_pass@1': 'eval/mbpp_pass_at_1',
  'tokens_per_sec': 'perf/tokens_per_sec',
  'step_time': 'perf/step_time',
  'tflops_per_device': 'perf/tflops_per_device',
  'mfu': 'perf/mfu',
}


class Meter:
  """Aggregates per-step metrics between two log lines.

  `loss` is the mean over the finite steps of the window (as Megatron-LM
  reports it); timing starts at the end of the window's first step after a
  restart, so compilation and evaluation are never counted as step time.
  """

  def __init__(
    self,
    *,
    tokens_per_step: int,
    flops_per_step_per_device: float,
    peak_tflops: float | None,
  ):
    self.tokens_per_step = tokens_per_step
    self.flops_per_step_per_device = flops_per_step_per_device
    self.peak_tflops = peak_tflops
    self._last: dict = {}
    self._losses: list[float] = []
    self.restart()

  def restart(self) -> None:
    self._t0, self._steps = None, 0

  def add(self, m: dict[str, float]) -> None:
    now = time.perf_counter()
    if self._t0 is None:
      self._t0 = now
    else:
      self._steps += 1
    if math.isfinite(m['loss']):
      self._losses.append(m['loss'])
    self._last = m

  def state(self) -> dict:
    """What a checkpoint keeps so that a resumed run logs the same losses."""
    return {'losses': list(self._losses)}

  def load_state(self, state: dict) -> None:
    self._losses = [float(x) for x in state['losses']]

  def summary(self) -> dict[str, float]:
    """The window's metrics; starts a new window."""
    keys = ('lr', 'grad_norm', 'target_tokens', 'nonfinite_total')
    out = {k: self._last[k] for k in keys}
    out['loss'] = sum(self._losses) / len(self._losses) if self._losses else self._last['loss']
    if self._steps:
      now = time.perf_counter()
      step_time = (now - self._t0) / self._steps
      tflops = self.flops_per_step_per_device / step_time / 1e12
      out.update(
        step_time=step_time,
        tokens_per_sec=self.tokens_per_step / step_time,
        tflops_per_device=tflops,
      )
      if self.peak_tflops:
        out['mfu'] = tflops / self.peak_tflops
      self._t0, self._steps = now, 0
    self._losses = []
    return out


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class Writer:
  """Appends one JSON line per logged step and mirrors it to TensorBoard."""

  def __init__(self, workdir: pathlib.Path, *, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self._start = time.time()
    self._start_step = None
    if enabled:
      self._jsonl = open(workdir / 'metrics.jsonl', 'a')
      self._tb = tensorboardX.SummaryWriter(str(workdir / 'tb'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for key, value in scalars.items():
      self._tb.add_scalar(TAGS.get(key, f'train/{key}'), value, step)
    self._tb.flush()

  def progress(self, step: int, scalars: dict[str, float]) -> None:
    """One live line: step/total, loss, throughput and the time left."""
    if not self.enabled:
      return
    if self._start_step is None:
      self._start_step, self._start = step, time.time()
    done = step - self._start_step
    eta = (time.time() - self._start) / done * (self.total_steps - step) if done else 0.0
    parts = [f'step {step}/{self.total_steps}']
    if 'loss' in scalars:
      parts.append(f'loss {scalars["loss"]:.4f}')
    if 'eval_loss' in scalars:
      parts.append(f'eval_loss {scalars["eval_loss"]:.4f}')
    if 'tokens_per_sec' in scalars:
      parts.append(f'{scalars["tokens_per_sec"]:,.0f} tok/s')
    if 'mfu' in scalars:
      parts.append(f'MFU {scalars["mfu"]:.1%}')
    elif 'tflops_per_device' in scalars:
      parts.append(f'{scalars["tflops_per_device"]:.3f} TFLOP/s/device')
    if done:
      parts.append(f'ETA {_duration(eta)}')
    print(' | '.join(parts), file=sys.stdout, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
