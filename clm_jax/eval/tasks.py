"""The code-eval tasks by name: one dispatcher for `launch eval` and training's code-eval hook."""

import pathlib

from clm_jax import config as config_lib
from clm_jax.eval import harness
from clm_jax.eval import humaneval
from clm_jax.eval import mbpp
from clm_jax.inference import generate
from clm_jax.train import hooks

TASKS = config_lib.CODE_EVAL_TASKS


def evaluate(
  task: str,
  complete,
  *,
  problems: int = 0,
  samples: int = 1,
  batch_size: int = 8,
  out_dir=None,
  split: str = 'test',
  data_path: str = '',
  allow_weaker: bool = False,
) -> dict:
  """Scores `complete` (prompts -> completions) on `task`; its summary, with pass@k.

  Args:
    task: One of TASKS.
    complete: As `harness.make_complete` builds.
    problems: Only the first N problems (of MBPP's `split`); 0 = all.
    samples: Completions per problem (n in pass@k).
    batch_size: Prompts per call of `complete`.
    out_dir: Where the samples and summary go; None = nowhere.
    split: MBPP's split.
    data_path: MBPP's data file; '' = the shipped one, checked by its checksum.
    allow_weaker: Run even where a sandbox layer is missing (`sandbox.require`).
  """
  common = dict(samples=samples, batch_size=batch_size, out_dir=out_dir, allow_weaker=allow_weaker)
  if task == 'mbpp':
    # The shipped file is checked against its published checksum; a given one is not.
    data = dict(data_path=data_path, sha256=None) if data_path else dict(sha256=mbpp.SHA256)
    ids = list(mbpp.SPLITS[split])[: problems or None]
    return mbpp.evaluate_mbpp(complete, split=split, task_ids=ids, **data, **common)
  if task == 'humaneval':
    chosen = dict(list(humaneval.load_problems().items())[: problems or None])
    return humaneval.evaluate_humaneval(complete, problems=chosen, **common)
  raise ValueError(f'unknown code-eval task {task!r}; expected one of {TASKS}')


def make_complete(cfg, params, tokenizer, *, seed: int = 0, **sampling):
  """`complete(prompts)` of a model: BOS + prompt, generated until EOS (see generate)."""

  def generate_fn(ids, batch_seed):
    return generate.generate(
      cfg,
      params,
      ids,
      stop_ids=(tokenizer.eos_id,),
      pad_id=tokenizer.pad_id,
      seed=batch_seed,
      **sampling,
    )

  return harness.make_complete(generate_fn, tokenizer, seed=seed)


class CodeEval(hooks.Hook):
  """Greedy pass@1 on `train.code_eval_tasks` every `train.code_eval_every` steps.

  Every process generates (the params are sharded) and runs the tests; process
  0 writes samples and summaries under workdir/eval/step_<N>/<task>/.
  """

  def due(self, step, run):
    every = run.c.train.code_eval_every
    return bool(every) and step % every == 0

  def __call__(self, step, run):
    c_train = run.c.train
    params = run.setup.to_checkpoint(run.state).params  # Plain layer order, as generate runs it.
    complete = make_complete(
      run.setup.model_cfg,
      params,
      run.tokenizer,
      max_new_tokens=c_train.code_eval_max_new_tokens,
    )
    out_dir = pathlib.Path(run.workdir) / 'eval' / f'step_{step}' if run.is_main else None
    scores = {}
    for task in filter(None, c_train.code_eval_tasks.split(',')):
      summary = evaluate(
        task,
        complete,
        problems=c_train.code_eval_problems,
        out_dir=out_dir / task if out_dir else None,
        allow_weaker=c_train.code_eval_allow_weaker_sandbox,
      )
      scores[f'{task}_pass@1'] = summary['pass@1']
    run.writer.write(step, scores)
    run.meter.restart()  # Evaluation time is not step time.
    return scores
