"""The training loop: config in, trained and checkpointed model out.

It dispatches step N before reading step N-1's metrics, so the host never
waits on the device except to keep one step in flight. Everything else
(evaluation, checkpoints, logging, stopping) is a hook (hooks.py).
"""

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from clm_jax import config as config_lib
from clm_jax.ckpt import checkpoint
from clm_jax.ckpt import load as load_lib
from clm_jax.data import loader
from clm_jax.data import tokenizer as tokenizer_lib
from clm_jax.model import attention
from clm_jax.model import flops
from clm_jax.parallel import sharding
from clm_jax.train import hooks as hooks_lib
from clm_jax.train import metrics as metrics_lib
from clm_jax.train import preemption
from clm_jax.train import step as step_lib


@dataclasses.dataclass
class Run:
  """What hooks see of a run; `state` is the latest step's."""

  c: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  setup: step_lib.Setup
  tokenizer: tokenizer_lib.Tokenizer
  train_iter: Any
  heldout_ds: Any
  checkpointer: checkpoint.Checkpointer
  writer: metrics_lib.Writer
  meter: metrics_lib.Meter
  state: Any = None
  start_step: int = 0
  last: dict = dataclasses.field(default_factory=dict)
  stop_reason: str | None = None

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def run(
  c,
  workdir: str | pathlib.Path,
  hooks: Sequence[hooks_lib.Hook] = (),
  *,
  restart_from_scratch: bool = False,
) -> dict:
  """Trains `c` into `workdir` (resuming from its latest intact checkpoint); returns final metrics.

  `hooks` run after the held-out evaluation and before the stop check and save.
  When every checkpoint in `workdir` is damaged, the run stops with
  `checkpoint.DamagedCheckpointError`, unless `restart_from_scratch`.
  """
  r = _prepare(c, pathlib.Path(workdir))
  with jax.set_mesh(r.mesh), preemption.StopRequest() as stop:
    _init_or_restore(r, restart_from_scratch)
    hooks = [
      hooks_lib.Log(),
      hooks_lib.HeldoutEval(),
      *hooks,
      hooks_lib.StopCheck(stop),
      hooks_lib.Save(),
    ]
    for hook in hooks:
      hook.start(r)
    pending = None  # (step, metrics) dispatched but not yet read

    def flush():
      nonlocal pending
      if pending:
        step, m = pending[0], hooks_lib.read_metrics(pending[1])
        pending = None
        hooks_lib.check_finite(step, m, c.train.max_nonfinite)
        for hook in hooks:
          hook.on_metrics(step, m, r)

    step = r.start_step
    for step in range(r.start_step + 1, c.train.steps + 1):
      r.state, metrics = r.setup.train_step(r.state, _next_batch(r))
      flush()
      pending = (step, metrics)
      for hook in hooks:
        if hook.due(step, r):
          flush()
          r.last.update(hook(step, r) or {})
      if r.stop_reason:
        logging.info('%s: saved step %d; exiting', r.stop_reason, step)
        break
    flush()
  r.checkpointer.wait()
  r.train_iter.close()
  r.checkpointer.close()
  r.writer.close()
  if r.is_main:
    logging.info('finished at step %d: %s', step, json.dumps(r.last))
  return r.last


def _next_batch(r: Run):
  host_batch = next(r.train_iter)
  if r.c.model.attention == 'cudnn':
    attention.check_segments(host_batch['segment_ids'], r.c.model.max_segments)
  return sharding.host_to_global(host_batch, r.mesh, r.c.train.global_batch_size)


def _tokenizer(c, workdir: pathlib.Path, is_main: bool) -> tokenizer_lib.Tokenizer:
  c_data = c.data
  if c.train.init_from and not c.data.tokenizer:
    # Fine-tuning reads text the way the pre-trained model did.
    path = pathlib.Path(c.train.init_from).expanduser() / tokenizer_lib.TOKENIZER_FILE
    if not path.is_file():
      raise FileNotFoundError(
        f'train.init_from={c.train.init_from!r} has no {tokenizer_lib.TOKENIZER_FILE}: it is '
        'not a run directory, params-only checkpoint or Hugging Face directory; or set '
        'data.tokenizer.'
      )
    c_data = c.data.copy_and_resolve_references()
    c_data.tokenizer = str(path)
  tok = tokenizer_lib.for_corpus(c_data, c.model.vocab_size)
  if is_main:
    shutil.copyfile(tok.path, workdir / tokenizer_lib.TOKENIZER_FILE)
  return tok


def _prepare(c, workdir: pathlib.Path) -> Run:
  """Validates `c`, writes config and tokenizer, builds the mesh, step and data."""
  config_lib.validate(c, jax.device_count())
  is_main = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main:
    (workdir / 'config.json').write_text(c.to_json_best_effort(indent=2) + '\n')
  tok = _tokenizer(c, workdir, is_main)
  mesh = sharding.make_mesh(c.mesh)
  s = step_lib.setup(c, mesh)
  kwargs = dict(
    seq_len=c.train.seq_len,
    batch_size=c.train.global_batch_size,
    seed=c.train.seed,
    rows=sharding.process_rows(mesh, c.train.global_batch_size),
  )
  train_iter = iter(loader.make_dataset(c.data, tok, split='train', **kwargs))
  heldout_ds = None
  if c.train.eval_batches and loader.has_heldout(c.data):
    heldout_ds = loader.make_dataset(c.data, tok, split='heldout', repeat=True, **kwargs)

  flops_per_token = flops.train_flops_per_token(s.model_cfg, c.train.seq_len)
  logging.info(
    'model: %s parameters, %.3g training FLOPs/token; mesh %s over %d devices (%s)',
    f'{s.param_count:,}',
    flops_per_token,
    dict(mesh.shape),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  ps = s.pipeline_schedule
  logging.info(
    'pipeline: %d stages x %d virtual, %d of %d micro-batches per pass: bubble %.1f%%',
    ps.stages,
    ps.virtual_stages,
    ps.microbatches,
    c.train.microbatches,
    100 * ps.bubble,
  )
  tokens_per_step = c.train.global_batch_size * c.train.seq_len
  meter = metrics_lib.Meter(
    tokens_per_step=tokens_per_step,
    flops_per_step_per_device=flops_per_token * tokens_per_step / jax.device_count(),
    peak_tflops=flops.peak_tflops(jax.devices()[0], c.train.peak_tflops),
  )
  return Run(
    c=c,
    workdir=workdir,
    mesh=mesh,
    setup=s,
    tokenizer=tok,
    train_iter=train_iter,
    heldout_ds=heldout_ds,
    checkpointer=checkpoint.Checkpointer(workdir, c.checkpoint),
    writer=metrics_lib.Writer(workdir, total_steps=c.train.steps, enabled=is_main),
    meter=meter,
  )


def _init_or_restore(r: Run, restart_from_scratch: bool) -> None:
  """The latest intact checkpoint's state, else a fresh (or `train.init_from`) one."""
  c, s = r.c, r.setup
  abstract = jax.eval_shape(s.init_state, jax.random.key(0))
  restored = r.checkpointer.restore_latest(
    abstract, r.train_iter, restart_from_scratch=restart_from_scratch
  )
  if restored is None:
    r.state, r.start_step = s.init_state(jax.random.key(c.train.seed)), 0
    if c.train.init_from:
      like = s.to_checkpoint(r.state)
      params = load_lib.load_pretrained(c.train.init_from, like.params, r.mesh)
      r.state = s.from_checkpoint(like.replace(params=params))
      logging.info('params from %s; optimizer state fresh', c.train.init_from)
    return
  r.start_step, state, loop_state = restored
  logging.info('resuming from %s/%d', r.checkpointer.directory, r.start_step)
  r.state = s.from_checkpoint(state)
  r.meter.load_state(loop_state['meter'])
