"""HumanEval scoring: the reference solutions pass, wrong ones fail, pass@k is exact."""

import collections
import itertools
import json
import math

import pytest

from clm_jax.eval import harness
from clm_jax.eval import humaneval
from clm_jax.eval import sandbox

PROBLEMS = humaneval.load_problems()


def _canonical(prompts):
  solutions = {p['prompt']: p['canonical_solution'] for p in PROBLEMS.values()}
  return [solutions[prompt] for prompt in prompts]


def _read_samples(out_dir):
  with open(out_dir / humaneval.SAMPLES_FILE) as f:
    return [json.loads(line) for line in f]


def test_the_problem_set_is_humaneval():
  assert len(PROBLEMS) == 164
  assert list(PROBLEMS)[:2] == ['HumanEval/0', 'HumanEval/1']
  assert PROBLEMS['HumanEval/0']['entry_point'] == 'has_close_elements'


def test_every_canonical_solution_passes(tmp_path):
  summary = humaneval.evaluate_humaneval(_canonical, batch_size=16, out_dir=tmp_path, timeout=30)
  records = _read_samples(tmp_path)
  assert [r['detail'] for r in records if not r['passed']] == []
  assert summary['pass@1'] == 1.0
  assert (summary['problems'], summary['samples'], summary['statuses']) == (164, 1, {'passed': 164})
  assert [r['task_id'] for r in records] == list(PROBLEMS)
  assert json.loads((tmp_path / humaneval.SUMMARY_FILE).read_text()) == summary


def test_wrong_completions_score_zero():
  bodies = ['    pass\n', '    return None\n', '    return 0\n', '', '    return []\n']
  wrong = dict(zip(PROBLEMS, itertools.cycle(bodies)))
  prompts_to_task = {p['prompt']: task_id for task_id, p in PROBLEMS.items()}
  summary = humaneval.evaluate_humaneval(
    lambda prompts: [wrong[prompts_to_task[p]] for p in prompts], batch_size=32, timeout=30
  )
  assert summary['pass@1'] == 0.0
  assert summary['statuses'] == {'failed': 164}


def test_samples_are_recorded_and_scored_per_problem(tmp_path):
  problems = {task_id: PROBLEMS[task_id] for task_id in list(PROBLEMS)[:6]}
  calls = collections.Counter()

  def every_third_is_wrong(prompts):
    completions = []
    for prompt, solution in zip(prompts, _canonical(prompts), strict=True):
      calls[prompt] += 1
      completions.append('    return None\n' if calls[prompt] % 3 == 2 else solution)
    return completions

  summary = humaneval.evaluate_humaneval(
    every_third_is_wrong, samples=3, batch_size=4, out_dir=tmp_path, problems=problems, timeout=30
  )
  assert summary['pass@1'] == pytest.approx(2 / 3)
  assert 'pass@10' not in summary
  records = _read_samples(tmp_path)
  assert [(r['task_id'], r['sample']) for r in records] == [
    (task_id, i) for task_id in problems for i in range(3)
  ]
  assert [r['passed'] for r in records] == [True, False, True] * 6
  assert {r['status'] for r in records} == {'passed', 'failed'}
  assert all(
    set(r) == {'task_id', 'sample', 'completion', 'passed', 'status', 'detail'} for r in records
  )
  assert records[1]['completion'] == '    return None\n'
  assert records[1]['detail'].startswith('AssertionError')


def test_a_hanging_completion_times_out():
  problems = {'HumanEval/0': PROBLEMS['HumanEval/0']}
  summary = humaneval.evaluate_humaneval(
    lambda prompts: ['    while True:\n        pass\n'] * len(prompts), problems=problems, timeout=1
  )
  assert summary['statuses'] == {'timeout': 1}


def test_complete_must_answer_every_prompt():
  with pytest.raises(ValueError, match='returned 1 completions for 2'):
    humaneval.evaluate_humaneval(lambda prompts: ['    pass\n'], batch_size=2)


@pytest.mark.parametrize(
  'n, c, k, expected',
  [
    (5, 2, 1, 0.4),
    (10, 3, 2, 1 - 21 / 45),
    (10, 3, 1, 0.3),
    (200, 0, 100, 0.0),
    (10, 8, 3, 1.0),  # n - c < k: any 3 of the 10 include a passing one
    (10, 10, 10, 1.0),
    (100, 17, 10, 1 - math.comb(83, 10) / math.comb(100, 10)),
  ],
)
def test_pass_at_k_matches_the_closed_form(n, c, k, expected):
  assert harness.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize('n, c, k', [(5, 6, 1), (5, 2, 6), (5, 2, 0), (5, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
  with pytest.raises(ValueError):
    harness.pass_at_k(n, c, k)


def test_summarize_reports_the_ks_that_fit():
  records = [{'task_id': 'a', 'passed': i < 3, 'status': 'x'} for i in range(10)]
  records += [{'task_id': 'b', 'passed': False, 'status': 'y'} for _ in range(10)]
  summary = harness.summarize(records, samples=10)
  assert summary['pass@1'] == pytest.approx((0.3 + 0.0) / 2)
  assert summary['pass@10'] == pytest.approx((1.0 + 0.0) / 2)
  assert 'pass@100' not in summary
  assert summary['statuses'] == {'x': 10, 'y': 10}


@pytest.mark.parametrize(
  'completion, expected',
  [
    ('    return x\n', '    return x\n'),
    ('    return x\n\ndef helper():\n    pass\n', '    return x\n'),
    ('    return x\n\n\nclass A:\n    pass', '    return x\n\n'),
    ('    return x\nif __name__ == "__main__":\n    main()', '    return x'),
    ('    return x\nprint(f(1))', '    return x'),
    ('    return x\n# tests\nassert f(1)', '    return x'),
    # Only unindented stop sequences end the function.
    ('    if x:\n        # positive\n        return x\n    print(x)\n', None),
    ('    def inner():\n        pass\n    return inner\n', None),
    ('\ndef f():\n    pass', ''),
  ],
)
def test_truncate_cuts_at_the_first_top_level_stop_sequence(completion, expected):
  assert harness.truncate(completion, humaneval.STOP_SEQUENCES) == (
    completion if expected is None else expected
  )


def test_the_program_runs_the_problems_check():
  problem = {
    'prompt': 'def f():\n',
    'test': 'def check(c):\n  assert c() == 1\n',
    'entry_point': 'f',
  }
  # The completion is untrusted; the prompt runs again on the judge's side.
  assert humaneval.program(problem, '    return 1') == sandbox.Program(
    untrusted='def f():\n    return 1\n',
    test='def check(c):\n  assert c() == 1\n\ncheck(f)\n',
    prelude='def f():\n',
    entry_points=('f',),
  )


class _DummyPrefixTokenizer:
  """Characters as ids, decoding like sentencepiece with a dummy prefix: the
  first ' ' of the text vanishes, so a continuation alone decodes wrong."""

  bos_id = 1

  def encode(self, text):
    return [ord(ch) + 2 for ch in text]

  def decode(self, ids):
    return ''.join(chr(i - 2) for i in ids if i != self.bos_id).removeprefix(' ')


def test_make_complete_decodes_in_context_and_prepends_bos():
  tokenizer = _DummyPrefixTokenizer()
  calls = []

  def generate_fn(token_lists, seed):
    calls.append((token_lists, seed))
    return [tokenizer.encode('    return 1\n'), tokenizer.encode('  x')]

  complete = harness.make_complete(generate_fn, tokenizer, seed=7)
  # The first prompt survives decoding; the second (leading ' ') does not.
  assert complete(['def f():\n', ' y']) == ['    return 1\n', ' x']
  assert calls[0][0] == [[1, *tokenizer.encode('def f():\n')], [1, *tokenizer.encode(' y')]]
  complete(['a', 'b'])
  assert [seed for _, seed in calls] == [7, 8]
