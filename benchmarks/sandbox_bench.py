"""Milliseconds per program in the code sandbox, today's against an earlier copy.

Times `sandbox.run` one program at a time (median over the runs) for a trivial
passing program and for each HumanEval canonical solution, then all 164
solutions at once over `sandbox.workers()` processes. With --before pointing
at an earlier sandbox.py (a self-contained copy; it runs a program as one
string: prompt + completion + test + check), the same for it, interleaved so
that both see the same machine load. Prints a Markdown table.

  python benchmarks/sandbox_bench.py [--before=/tmp/sandbox_before.py] [--repeats=30]
"""

import importlib.util
import statistics
import time

from absl import app
from absl import flags

from clm_jax.eval import humaneval
from clm_jax.eval import sandbox

_BEFORE = flags.DEFINE_string('before', '', 'An earlier sandbox.py to compare with.')
_REPEATS = flags.DEFINE_integer('repeats', 30, 'Timed runs of the trivial program.')
_TIMEOUT = 30.0


def _load(path: str):
  spec = importlib.util.spec_from_file_location('sandbox_before', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _one_string(problem) -> str:
  """The single-process recipe of the earlier sandbox."""
  return (
    problem['prompt']
    + problem['canonical_solution']
    + '\n'
    + problem['test']
    + '\n'
    + f'check({problem["entry_point"]})'
  )


def _timed(run, program) -> float:
  start = time.perf_counter()
  result = run(program)
  elapsed = (time.perf_counter() - start) * 1e3
  if not result.passed:
    raise RuntimeError(f'a reference program did not pass: {result}')
  return elapsed


def main(argv):
  del argv
  problems = humaneval.load_problems()
  sandboxes = {'now': (lambda p: sandbox.run(p, timeout=_TIMEOUT), sandbox.run_many)}
  programs = {
    'now': [humaneval.program(p, p['canonical_solution']) for p in problems.values()],
  }
  if _BEFORE.value:
    before = _load(_BEFORE.value)
    sandboxes['before'] = (lambda p: before.run(p, timeout=_TIMEOUT), before.run_many)
    programs['before'] = [_one_string(p) for p in problems.values()]
  trivial = {name: [] for name in sandboxes}
  solutions = {name: [] for name in sandboxes}
  for _ in range(_REPEATS.value):
    for name, (run, _) in sandboxes.items():
      trivial[name].append(_timed(run, 'assert 1 + 1 == 2'))
  for i in range(len(problems)):
    for name, (run, _) in sandboxes.items():
      solutions[name].append(_timed(run, programs[name][i]))
  parallel = {}
  for name, (_, run_many) in sandboxes.items():
    start = time.perf_counter()
    results = run_many(programs[name], timeout=_TIMEOUT)
    parallel[name] = time.perf_counter() - start
    assert all(r.passed for r in results), name
  print(f'isolation now: {sandbox.isolation()}; {sandbox.workers()} workers')
  print('| sandbox | trivial program, median ms | HumanEval canonical, median ms '
        '(p90) | all 164 in parallel, s |')  # fmt: skip
  print('|---|---|---|---|')
  for name in sandboxes:
    p90 = statistics.quantiles(solutions[name], n=10)[-1]
    print(
      f'| {name} | {statistics.median(trivial[name]):.1f} | '
      f'{statistics.median(solutions[name]):.1f} ({p90:.1f}) | {parallel[name]:.2f} |'
    )


if __name__ == '__main__':
  app.run(main)
