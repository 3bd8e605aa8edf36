"""The training loop: config in, trained and checkpointed model out.

It dispatches step N before reading step N-1's metrics, so the host never
waits on the device except to keep one step in flight.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
from absl import logging

from clm_jax import attention
from clm_jax import checkpoint
from clm_jax import config as config_lib
from clm_jax import evaluate as evaluate_lib
from clm_jax import flops
from clm_jax import generate
from clm_jax import mbpp
from clm_jax import metrics as metrics_lib
from clm_jax import plan
from clm_jax import preemption
from clm_jax import sharding
from clm_jax import tokenizer as tokenizer_lib
from clm_jax import train
from clm_jax.data import pipeline


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def _datasets(c, tok, mesh):
  """(train iterator, held-out dataset) of this process's rows of the global batches."""
  kwargs = dict(
    seq_len=c.train.seq_len,
    batch_size=c.train.global_batch_size,
    seed=c.train.seed,
    rows=sharding.process_rows(mesh, c.train.global_batch_size),
  )
  train_ds = pipeline.make_dataset(c.data, tok, split='train', **kwargs)
  heldout_ds = None
  if c.train.eval_batches and pipeline.has_heldout(c.data):
    heldout_ds = pipeline.make_dataset(c.data, tok, split='heldout', repeat=True, **kwargs)
  return iter(train_ds), heldout_ds


def evaluate(s: train.Setup, params, heldout_ds, num_batches: int, batch_size: int) -> float:
  """Mean held-out loss per target token over the first `num_batches` batches."""
  total, count = 0.0, 0.0
  it = iter(heldout_ds)
  try:
    for _ in range(num_batches):
      loss_sum, n = s.eval_step(params, sharding.host_to_global(next(it), s.mesh, batch_size))
      total, count = total + float(loss_sum), count + float(n)
  finally:
    it.close()
  return total / max(count, 1.0)


def code_eval(s: train.Setup, state, tok, c_train, out_dir) -> dict:
  """Greedy pass@1 of the current params on each of `train.code_eval_tasks`.

  Every process generates (the params are sharded); each runs the tests, and
  process 0 writes the samples and summaries.

  Args:
    s: The setup.
    state: The train state, in the setup's storage layout.
    tok: The run's tokenizer.
    c_train: The `train` config: code_eval_tasks, _problems, _max_new_tokens.
    out_dir: Where process 0 writes <task>/ samples and summary; None = nowhere.

  Returns:
    {'<task>_pass@1': ...} for each task.
  """
  params = s.to_checkpoint(state).params  # Plain layer order, as generate runs it.

  def generate_fn(ids, seed):
    return generate.generate(
      s.model_cfg,
      params,
      ids,
      max_new_tokens=c_train.code_eval_max_new_tokens,
      stop_ids=(tok.eos_id,),
      pad_id=tok.pad_id,
      seed=seed,
    )

  complete = evaluate_lib.make_complete(generate_fn, tok)
  n = c_train.code_eval_problems or None
  out = {}
  for task in filter(None, c_train.code_eval_tasks.split(',')):
    task_dir = out_dir / task if out_dir else None
    if task == 'mbpp':
      ids = list(mbpp.SPLITS['test'])[:n]
      summary = mbpp.evaluate_mbpp(complete, task_ids=ids, sha256=mbpp.SHA256, out_dir=task_dir)
    else:
      problems = dict(list(evaluate_lib.load_problems().items())[:n])
      summary = evaluate_lib.evaluate_humaneval(complete, problems=problems, out_dir=task_dir)
    out[f'{task}_pass@1'] = summary['pass@1']
  return out


def _log_memory_estimate(c) -> None:
  """The planner's bytes per device, and a warning where they exceed the device's pool."""
  mem = plan.memory(c, plan.layout_of(c, jax.device_count()))
  gib = 2**30
  logging.info(
    'memory per device, estimated (see `launch plan`): %.2f GiB = params %.2f + optimizer '
    '%.2f + gradients %.2f + activations %.2f + working set %.2f',
    mem.total / gib,
    mem.params / gib,
    mem.optimizer / gib,
    mem.gradients / gib,
    mem.saved_activations / gib,
    mem.working_set / gib,
  )
  limit = (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit')
  if limit and mem.total > limit:
    logging.warning(
      'the estimate exceeds the %.1f GiB this device gives XLA: expect out-of-memory; '
      '`python -m launch plan` lists layouts that fit',
      limit / gib,
    )


def run(c, workdir: str | pathlib.Path) -> dict:
  """Trains `c` into `workdir` (resuming from its latest checkpoint) and returns final metrics."""
  config_lib.validate(c, jax.device_count())
  workdir = pathlib.Path(workdir)
  is_main = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main:
    (workdir / 'config.json').write_text(c.to_json_best_effort(indent=2) + '\n')

  c_data = c.data
  if c.train.init_from and not c.data.tokenizer:
    # Fine-tuning reads text the way the pre-trained model did.
    tokenizer_path = pathlib.Path(c.train.init_from).expanduser() / 'tokenizer.model'
    if not tokenizer_path.is_file():
      raise FileNotFoundError(
        f'train.init_from={c.train.init_from!r} has no tokenizer.model: it is not a run '
        'directory, params-only checkpoint or Hugging Face directory; or set data.tokenizer.'
      )
    c_data = c.data.copy_and_resolve_references()
    c_data.tokenizer = str(tokenizer_path)
  tok = tokenizer_lib.for_corpus(c_data, c.model.vocab_size)
  if is_main:
    shutil.copyfile(tok.path, workdir / 'tokenizer.model')
  mesh = sharding.make_mesh(c.mesh)
  s = train.setup(c, mesh)
  train_it, heldout_ds = _datasets(c, tok, mesh)

  flops_per_token = flops.train_flops_per_token(s.model_cfg, c.train.seq_len)
  peak = flops.peak_tflops(jax.devices()[0], c.train.peak_tflops)
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

  _log_memory_estimate(c)

  ckpt = checkpoint.Checkpointer(workdir, c.checkpoint)
  writer = metrics_lib.Writer(workdir, total_steps=c.train.steps, enabled=is_main)
  tokens_per_step = c.train.global_batch_size * c.train.seq_len
  meter = metrics_lib.Meter(
    tokens_per_step=tokens_per_step,
    flops_per_step_per_device=flops_per_token * tokens_per_step / jax.device_count(),
    peak_tflops=peak,
  )
  last: dict = {}
  with jax.set_mesh(mesh), preemption.StopRequest() as stop:
    abstract = jax.eval_shape(s.init_state, jax.random.key(0))
    restored = ckpt.restore_latest(abstract, train_it)
    if restored is None:
      state, start = s.init_state(jax.random.key(c.train.seed)), 0
      if c.train.init_from:
        like = s.to_checkpoint(state)
        params = checkpoint.load_pretrained(c.train.init_from, like.params, mesh)
        state = s.from_checkpoint(like.replace(params=params))
        logging.info('params from %s; optimizer state fresh', c.train.init_from)
    else:
      start, state, loop_state = restored
      logging.info('resuming from %s/%d', ckpt.directory, start)
      state = s.from_checkpoint(state)
      meter.load_state(loop_state['meter'])
    pending = None  # (step, metrics) dispatched but not yet read

    def finish(step, metrics):
      nonlocal last
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if m['nonfinite_in_a_row'] >= c.train.max_nonfinite > 0:
        raise NonFiniteError(
          f'step {step}: {int(m["nonfinite_in_a_row"])} steps in a row had a non-finite '
          f'loss or gradient (loss={m["loss"]}); their updates were skipped and the last '
          'checkpoint is intact. Lower optim.peak_lr or raise train.max_nonfinite.'
        )
      meter.add(m)
      if step == 1 or step % c.train.log_every == 0 or step == c.train.steps:
        last = meter.summary()
        writer.write(step, last)
        writer.progress(step, last)
      elif step == start + 1:  # A sign of life after a resume; the window goes on.
        writer.progress(step, {'loss': m['loss']})

    def save(step):
      ckpt.save(
        step,
        s.to_checkpoint(state),
        train_it,
        config=c.to_dict(),
        tokenizer_path=tok.path,
        loop={'meter': meter.state()},
      )

    step = start
    for step in range(start + 1, c.train.steps + 1):
      host_batch = next(train_it)
      if c.model.attention == 'cudnn':
        attention.check_segments(host_batch['segment_ids'], c.model.max_segments)
      batch = sharding.host_to_global(host_batch, mesh, c.train.global_batch_size)
      state, metrics = s.train_step(state, batch)
      if pending:
        finish(*pending)
      pending = (step, metrics)
      evaluate_now = c.train.eval_every and step % c.train.eval_every == 0
      if (evaluate_now or step == c.train.steps) and heldout_ds is not None:
        finish(*pending)
        pending = None
        eval_loss = evaluate(
          s, state.params, heldout_ds, c.train.eval_batches, c.train.global_batch_size
        )
        last = {
          **last,
          'eval_loss': eval_loss,
          'eval_perplexity': float(np.exp(eval_loss)),
        }
        writer.write(step, {'eval_loss': eval_loss, 'eval_perplexity': last['eval_perplexity']})
        writer.progress(step, {'eval_loss': eval_loss})
        meter.restart()  # Evaluation time is not step time.
      if c.train.code_eval_every and step % c.train.code_eval_every == 0:
        if pending:
          finish(*pending)
          pending = None
        scores = code_eval(
          s, state, tok, c.train, workdir / 'eval' / f'step_{step}' if is_main else None
        )
        last = {**last, **scores}
        writer.write(step, scores)
        meter.restart()  # Evaluation time is not step time.
      stopping = stop.requested(step)
      if step % c.checkpoint.every == 0 or step == c.train.steps or stopping:
        # The saved meter must hold this step's loss; the save waits for this
        # step's state anyway, so reading its metrics now costs nothing.
        if pending:
          finish(*pending)
          pending = None
        save(step)
      if stopping:
        logging.info('%s: saved step %d; exiting', stop.reason, step)
        break
    if pending:
      finish(*pending)
  ckpt.wait()
  train_it.close()
  ckpt.close()
  writer.close()
  if is_main:
    logging.info('finished at step %d: %s', step, json.dumps(last))
  return last
