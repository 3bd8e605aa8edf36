"""MBPP functional correctness, as in the MBPP and CodeLlama papers.

MBPP (Austin et al. 2021, https://arxiv.org/abs/2108.07732) has 974 short
Python problems, each a one-sentence task, a reference solution and three
asserts. The model sees a 3-shot prompt (tasks 2, 3 and 4 solved, then the
task and its asserts) and writes a solution up to "[DONE]". A sample passes
when `test_setup_code + asserts` run without an exception against the
completion, judged in `clm_jax.eval.sandbox` (`program`); scores are pass@k as
for HumanEval (`clm_jax.eval.harness`). CodeLlama reports pass@1 on the 500
test tasks, greedy.

The data ships with the repository (data/mbpp/, CC BY 4.0; its README says
where from and how to check it), so no network is needed.
"""

import builtins
import hashlib
import json
import os
import pathlib
import symtable
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence

from clm_jax.eval import harness
from clm_jax.eval import sandbox

DATA_PATH = pathlib.Path(__file__).resolve().parents[2] / 'data' / 'mbpp' / 'mbpp.jsonl'
# Of the google-research release (see data/mbpp/README.md); pass it as
# `sha256` to be sure the data scored is the benchmark.
SHA256 = '0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a'
# The split by task id of the MBPP README (google-research/mbpp) and paper.
SPLITS = {
  'prompt': range(1, 11),
  'test': range(11, 511),
  'validation': range(511, 601),
  'train': range(601, 975),
}
FEW_SHOT_IDS = (2, 3, 4)
FIELDS = ('text', 'code', 'task_id', 'test_setup_code', 'test_list')
# The end marker of the few-shot answers. The prompt's opening words end a
# sample too: a model that skips "[DONE]" goes on to invent the next task.
STOP_SEQUENCES = ('[DONE]', 'You are an expert Python programmer')
# Seconds per program. Not HumanEval's 3: task 123's reference solution alone
# takes 2.5 s on one core, so with every core busy it would time out.
TIMEOUT = 10.0
SAMPLES_FILE = 'mbpp_samples.jsonl'
SUMMARY_FILE = 'mbpp_summary.json'


class MBPPError(ValueError):
  """The MBPP data file is malformed or not the one expected."""


def load(path: str | os.PathLike = DATA_PATH, *, sha256: str | None = None) -> dict[int, dict]:
  """Reads an MBPP JSONL file: task id -> record, in file order.

  Args:
    path: One JSON object a line with at least the keys in FIELDS.
    sha256: When given, the file's hex SHA-256 must equal it (e.g. SHA256).

  Raises:
    MBPPError: The checksum differs, or a line ('mbpp.jsonl:LINE: ...') is not
      JSON, lacks a field, has one of the wrong type, or repeats a task id.
  """
  path = pathlib.Path(path)
  data = path.read_bytes()
  if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256.lower():
    raise MBPPError(f'{path}: sha256 is {actual}, expected {sha256}: not the MBPP file expected')
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise MBPPError(f'{path}: not UTF-8: {e}') from None
  # Not splitlines(): it would also split at characters JSON strings may hold.
  lines = text.split('\n')
  if lines[-1] == '':
    lines.pop()
  tasks = {}
  for number, line in enumerate(lines, start=1):
    where = f'{path}:{number}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise MBPPError(f'{where}: not a JSON line: {e}') from None
    _check(record, where)
    if record['task_id'] in tasks:
      raise MBPPError(f'{where}: task_id {record["task_id"]} appears twice')
    tasks[record['task_id']] = record
  return tasks


def _check(record, where: str) -> None:
  if not isinstance(record, dict):
    raise MBPPError(f'{where}: expected a JSON object, got {type(record).__name__}')
  if missing := [field for field in FIELDS if field not in record]:
    raise MBPPError(f'{where}: missing field(s) {", ".join(missing)}')
  # bool is an int to Python, never a task id.
  if not isinstance(record['task_id'], int) or isinstance(record['task_id'], bool):
    raise MBPPError(f'{where}: task_id must be an integer, got {record["task_id"]!r}')
  for field in ('text', 'code', 'test_setup_code'):
    if not isinstance(record[field], str):
      raise MBPPError(f'{where}: {field} must be a string')
  tests = record['test_list']
  if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
    raise MBPPError(f'{where}: test_list must be a non-empty list of strings')


def tasks_of_split(tasks: Mapping[int, dict], name: str) -> dict[int, dict]:
  """The tasks of split `name` (a key of SPLITS) that `tasks` holds, in id order."""
  if name not in SPLITS:
    raise ValueError(f'unknown MBPP split {name!r}; one of {", ".join(SPLITS)}')
  return {task_id: tasks[task_id] for task_id in SPLITS[name] if task_id in tasks}


def _describe(task: Mapping) -> str:
  return (
    f'You are an expert Python programmer, and here is your task: {task["text"]}'
    ' Your code should pass these tests:\n\n' + '\n'.join(task['test_list']) + '\n[BEGIN]\n'
  )


def prompt(task: Mapping, shots: Iterable[Mapping]) -> str:
  """The few-shot prompt for `task`: each shot solved, then `task` up to "[BEGIN]\\n".

  The layout of one shot is the MBPP README's (google-research/google-research,
  mbpp/README.md): "You are an expert Python programmer, and here is your task:
  {prompt} Your code should pass these tests:\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]",
  the tests one a line. Shots are joined and followed by a blank line, as in
  EleutherAI lm-evaluation-harness's `mbpp` task (doc_to_text + code + "\\n[DONE]",
  its default fewshot_delimiter "\\n\\n"), a widely used open version of the
  3-shot setup that the MBPP and CodeLlama papers report. Texts, tests and code go in verbatim, the code with its
  original "\\r\\n" line ends and trailing spaces, as that harness has them.
  """
  solved = ''.join(_describe(shot) + shot['code'] + '\n[DONE]\n\n' for shot in shots)
  return solved + _describe(task)


def program(task: Mapping, completion: str) -> sandbox.Program:
  """The program that passes iff `completion` solves `task`.

  The judge runs the setup code and the asserts against the completion's
  `entry_points`: task 367's setup builds its test trees with the `Node`
  class that the solution defines.
  """
  return sandbox.Program(untrusted=completion, test=_test(task), entry_points=entry_points(task))


def entry_points(task: Mapping) -> tuple[str, ...]:
  """The names the task's tests take from the solution, sorted.

  Those the setup code and asserts use without defining them; of builtins,
  only those the reference solution redefines (task 126 tests its own `sum`):
  a completion must not replace the `len` or `set` that a test relies on.

  Raises:
    MBPPError: The tests do not parse.
  """
  try:
    top = _symbols(_test(task))
  except SyntaxError as e:
    raise MBPPError(f'task {task["task_id"]}: its tests do not parse: {e}') from None
  tables, read = [top], set()
  while tables:
    table = tables.pop()
    for symbol in table.get_symbols():
      if symbol.is_referenced() and (table is top or symbol.is_global()):
        read.add(symbol.get_name())
    tables.extend(table.get_children())
  try:
    redefined = _defined(_symbols(task['code']))
  except SyntaxError:
    redefined = set()
  return tuple(
    sorted(
      name for name in read - _defined(top) if not hasattr(builtins, name) or name in redefined
    )
  )


def _test(task: Mapping) -> str:
  return '\n'.join([task['test_setup_code'], *task['test_list'], ''])


def _symbols(code: str) -> symtable.SymbolTable:
  with warnings.catch_warnings():
    # Reference solutions hold regexes with invalid escapes: compiling them warns.
    warnings.simplefilter('ignore', SyntaxWarning)
    warnings.simplefilter('ignore', DeprecationWarning)
    return symtable.symtable(code, 'mbpp.py', 'exec')


def _defined(top: symtable.SymbolTable) -> set[str]:
  """The names bound at the top level (def, class, assignment, import)."""
  return {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}


def evaluate_mbpp(
  complete: Callable[[list[str]], Sequence[str]],
  *,
  data_path: str | os.PathLike = DATA_PATH,
  split: str = 'test',
  samples: int = 1,
  batch_size: int = 8,
  out_dir: str | os.PathLike | None = None,
  timeout: float = TIMEOUT,
  sha256: str | None = None,
  limits: sandbox.Limits | None = None,
  max_workers: int | None = None,
  task_ids: Iterable[int] | None = None,
  allow_weaker: bool = False,
) -> dict:
  """Scores `complete` on MBPP, 3-shot: pass@k for each k in harness.KS up to `samples`.

  Args:
    complete: Prompts -> one completion each (the code after "[BEGIN]\\n"; it
      is cut at "[DONE]"). It should sample when `samples` > 1 and decode
      greedily when it is 1. `harness.make_complete` builds one.
    data_path: The MBPP JSONL file; default the repository's copy.
    split: 'test' (task ids 11-510, the one papers report), 'validation'
      (511-600), 'train' (601-974) or 'prompt' (1-10).
    samples: Completions per task (n in pass@k).
    batch_size: Prompts per call of `complete`.
    out_dir: Where to write SAMPLES_FILE (one JSON line per sample: task_id,
      sample, completion, passed, status, detail) and SUMMARY_FILE; None: nowhere.
    timeout: Wall-clock seconds per program.
    sha256: When given, the data file must have this checksum (e.g. SHA256).
    limits: Sandbox resource limits; default `sandbox.Limits()`.
    max_workers: Programs run at once; default `sandbox.workers()`, one per CPU.
    task_ids: Only these tasks of the split, in this order; default all.
    allow_weaker: Run even where a sandbox layer is missing (`sandbox.require`).

  Returns:
    {'pass@1': ..., 'problems': ..., 'samples': ..., 'statuses': {status: count},
     'seconds': ...}, as `humaneval.evaluate_humaneval`.

  Raises:
    MBPPError: The data file is malformed, has the wrong checksum, lacks the
      few-shot tasks or any task of the split, or a task's tests do not parse.
    sandbox.SandboxError: A sandbox layer is missing and `allow_weaker` is False.
  """
  all_tasks = load(data_path, sha256=sha256)
  tasks = _select(all_tasks, split, task_ids, data_path)
  if missing := [task_id for task_id in FEW_SHOT_IDS if task_id not in all_tasks]:
    raise MBPPError(f'{data_path}: no few-shot task(s) {missing}')
  shots = [all_tasks[task_id] for task_id in FEW_SHOT_IDS]
  # Each task's tests parsed once, and all of them before any generation.
  points = {task_id: entry_points(task) for task_id, task in tasks.items()}
  return harness.evaluate_programs(
    complete,
    {task_id: prompt(task, shots) for task_id, task in tasks.items()},
    lambda task_id, completion: sandbox.Program(
      untrusted=completion, test=_test(tasks[task_id]), entry_points=points[task_id]
    ),
    name='MBPP',
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


def _select(all_tasks, split_name, task_ids, data_path) -> dict[int, dict]:
  tasks = tasks_of_split(all_tasks, split_name)
  # A file short of tasks would give a score on a different benchmark.
  if missing := [task_id for task_id in SPLITS[split_name] if task_id not in tasks]:
    raise MBPPError(f'{data_path}: split {split_name!r} lacks {len(missing)} task(s): {missing}')
  if task_ids is None:
    return tasks
  task_ids = list(task_ids)
  if outside := [task_id for task_id in task_ids if task_id not in tasks]:
    raise ValueError(f'task ids {outside} are not in the {split_name!r} split')
  return {task_id: tasks[task_id] for task_id in task_ids}
