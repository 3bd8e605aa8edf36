"""MBPP scoring: the shipped data, the 3-shot prompt, reference solutions pass, wrong ones fail."""

import hashlib
import json

import pytest

from clm_jax.eval import harness
from clm_jax.eval import mbpp
from clm_jax.eval import sandbox

TASKS = mbpp.load()
# data/mbpp/README.md: reference solutions that fail on current CPython
# (set iteration order, sys.getsizeof), by split. 341 (a set's order) passes
# now: the set reaches the solution rebuilt, in an order its test expects.
KNOWN_FAILURES = {'test': set(), 'validation': {596}, 'train': {642}}
# A fake model finds the task by what the prompt ends with: the last task's
# text and tests (two tasks share their tests, none their text and tests).
_BY_END = {
  f'{t["text"]} Your code should pass these tests:\n\n'
  + '\n'.join(t['test_list'])
  + '\n[BEGIN]\n': t
  for t in TASKS.values()
}


def _task_of(prompt):
  return _BY_END[prompt.rpartition('here is your task: ')[2]]


def _reference(prompts):
  return [_task_of(p)['code'] for p in prompts]


def _read_samples(out_dir):
  with open(out_dir / mbpp.SAMPLES_FILE) as f:
    return [json.loads(line) for line in f]


def test_the_shipped_file_is_the_mbpp_release():
  path = mbpp.DATA_PATH
  assert path.parts[-3:] == ('data', 'mbpp', 'mbpp.jsonl')
  assert hashlib.sha256(path.read_bytes()).hexdigest() == mbpp.SHA256
  assert mbpp.load(sha256=mbpp.SHA256) == TASKS
  assert list(TASKS) == list(range(1, 975))


@pytest.mark.parametrize(
  'name, first, last, count',
  [
    ('prompt', 1, 10, 10),
    ('test', 11, 510, 500),
    ('validation', 511, 600, 90),
    ('train', 601, 974, 374),
  ],
)
def test_splits_are_by_task_id(name, first, last, count):
  tasks = mbpp.tasks_of_split(TASKS, name)
  assert list(tasks) == list(range(first, last + 1))
  assert len(tasks) == count
  assert all(tasks[task_id] is TASKS[task_id] for task_id in tasks)


def test_the_splits_cover_every_task_once():
  ids = [task_id for name in mbpp.SPLITS for task_id in mbpp.tasks_of_split(TASKS, name)]
  assert sorted(ids) == list(range(1, 975))


def test_unknown_split_and_task_outside_the_split_are_refused():
  with pytest.raises(ValueError, match='unknown MBPP split'):
    mbpp.evaluate_mbpp(_reference, split='dev')
  with pytest.raises(ValueError, match=r'\[600\] are not in the \'test\' split'):
    mbpp.evaluate_mbpp(_reference, task_ids=[11, 600])


def test_the_prompt_of_task_11_is_exactly_the_3_shot_layout():
  # Written out from the data file's fields (tasks 2, 3, 4 and 11), code with
  # its original \r\n line ends and trailing spaces.
  expected = (
    'You are an expert Python programmer, and here is your task: Write a function to find the'
    ' similar elements from the given two tuple lists. Your code should pass these tests:\n'
    '\n'
    'assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n'
    'assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n'
    'assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n'
    '[BEGIN]\n'
    'def similar_elements(test_tup1, test_tup2):\r\n'
    '  res = tuple(set(test_tup1) & set(test_tup2))\r\n'
    '  return (res) \n'
    '[DONE]\n'
    '\n'
    'You are an expert Python programmer, and here is your task: Write a python function to'
    ' identify non-prime numbers. Your code should pass these tests:\n'
    '\n'
    'assert is_not_prime(2) == False\n'
    'assert is_not_prime(10) == True\n'
    'assert is_not_prime(35) == True\n'
    '[BEGIN]\n'
    'import math\r\n'
    'def is_not_prime(n):\r\n'
    '    result = False\r\n'
    '    for i in range(2,int(math.sqrt(n)) + 1):\r\n'
    '        if n % i == 0:\r\n'
    '            result = True\r\n'
    '    return result\n'
    '[DONE]\n'
    '\n'
    'You are an expert Python programmer, and here is your task: Write a function to find the'
    ' largest integers from a given list of numbers using heap queue algorithm. Your code should'
    ' pass these tests:\n'
    '\n'
    'assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] \n'
    'assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] \n'
    'assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]\n'
    '[BEGIN]\n'
    'import heapq as hq\r\n'
    'def heap_queue_largest(nums,n):\r\n'
    '  largest_nums = hq.nlargest(n, nums)\r\n'
    '  return largest_nums\n'
    '[DONE]\n'
    '\n'
    'You are an expert Python programmer, and here is your task: Write a python function to'
    ' remove first and last occurrence of a given character from the string. Your code should'
    ' pass these tests:\n'
    '\n'
    'assert remove_Occ("hello","l") == "heo"\n'
    'assert remove_Occ("abcda","a") == "bcd"\n'
    'assert remove_Occ("PHP","P") == "H"\n'
    '[BEGIN]\n'
  )
  prompts = []
  mbpp.evaluate_mbpp(lambda p: prompts.extend(p) or [''] * len(p), task_ids=[11], timeout=30)
  assert prompts == [expected]
  assert mbpp.prompt(TASKS[11], [TASKS[2], TASKS[3], TASKS[4]]) == expected


def test_the_program_is_the_completion_judged_by_setup_then_asserts():
  task = {
    'test_setup_code': 'x = 1',
    'test_list': ['assert f(x) == 2', 'assert len([f(y) for y in (0,)]) == 1'],
    'code': 'def f(a):\n  return a + 1',
  }
  # The tests take f from the completion, and len and y never.
  assert mbpp.program(task, 'def f(a):\n  return a + 1') == sandbox.Program(
    untrusted='def f(a):\n  return a + 1',
    test='x = 1\nassert f(x) == 2\nassert len([f(y) for y in (0,)]) == 1\n',
    entry_points=('f',),
  )


@pytest.mark.parametrize(
  'task_id, names',
  [(11, ('remove_Occ',)), (126, ('sum',)), (367, ('Node', 'is_tree_balanced'))],
)
def test_entry_points_are_what_the_tests_take_from_the_solution(task_id, names):
  # 126's solution is a function named sum, which its tests call.
  assert mbpp.entry_points(TASKS[task_id]) == names


@pytest.mark.parametrize('split', ['test', 'validation'])
def test_reference_solutions_pass_except_the_known_failures(split, tmp_path):
  summary = mbpp.evaluate_mbpp(_reference, split=split, batch_size=64, out_dir=tmp_path, timeout=30)
  records = _read_samples(tmp_path)
  failed = {r['task_id']: r['detail'] for r in records if not r['passed']}
  assert set(failed) == KNOWN_FAILURES[split], failed
  assert all(detail.startswith('AssertionError') for detail in failed.values())
  count = len(mbpp.SPLITS[split])
  assert summary['pass@1'] == pytest.approx((count - len(failed)) / count)
  assert (summary['problems'], summary['samples']) == (count, 1)
  statuses = {'passed': count - len(failed), 'failed': len(failed)}
  assert summary['statuses'] == {status: n for status, n in statuses.items() if n}
  assert [r['task_id'] for r in records] == list(mbpp.SPLITS[split])
  assert all(
    set(r) == {'task_id', 'sample', 'completion', 'passed', 'status', 'detail'} for r in records
  )
  assert json.loads((tmp_path / mbpp.SUMMARY_FILE).read_text()) == summary


def test_the_known_train_failure_fails_and_its_neighbours_pass():
  # The whole train split would take a while; the tasks around 642 show the same.
  ids = list(range(630, 655))
  records = []

  def reference(prompts):
    records.extend(_task_of(p)['task_id'] for p in prompts)
    return _reference(prompts)

  summary = mbpp.evaluate_mbpp(reference, split='train', task_ids=ids, batch_size=64, timeout=30)
  assert records == ids
  assert summary['statuses'] == {'passed': len(ids) - 1, 'failed': 1}


def test_wrong_solutions_score_zero():
  ids = list(mbpp.SPLITS['test'])[::5]
  # Half get a stub, half the reference solution of the next task in the split.
  wrong = {
    task_id: 'def f(): pass' if k % 2 else TASKS[task_id + 1]['code']
    for k, task_id in enumerate(ids)
  }
  summary = mbpp.evaluate_mbpp(
    lambda prompts: [wrong[_task_of(p)['task_id']] for p in prompts],
    task_ids=ids,
    batch_size=64,
    timeout=30,
  )
  assert summary['pass@1'] == 0.0
  assert summary['statuses'] == {'failed': len(ids)}


def test_completions_are_cut_at_done_and_scored_per_sample(tmp_path):
  ids = [11, 12, 13]
  calls = {}

  def every_other_is_wrong(prompts):
    completions = []
    for prompt in prompts:
      calls[prompt] = calls.get(prompt, 0) + 1
      code = _task_of(prompt)['code'] if calls[prompt] % 2 else 'def remove_Occ(s, ch): return s'
      # What a model writes after the answer must not count.
      completions.append(code + '\n[DONE]\n\nYou are an expert Python programmer, and here')
    return completions

  summary = mbpp.evaluate_mbpp(
    every_other_is_wrong, samples=2, batch_size=4, task_ids=ids, out_dir=tmp_path, timeout=30
  )
  assert summary['pass@1'] == pytest.approx(0.5)
  assert 'pass@10' not in summary
  records = _read_samples(tmp_path)
  assert [(r['task_id'], r['sample'], r['passed']) for r in records] == [
    (task_id, i, i == 0) for task_id in ids for i in range(2)
  ]
  assert records[0]['completion'] == TASKS[11]['code'] + '\n'
  assert records[1]['completion'] == 'def remove_Occ(s, ch): return s\n'


@pytest.mark.parametrize(
  'text, cut',
  [
    ('def f():\n  return 1\n[DONE]\nmore', 'def f():\n  return 1\n'),
    ('x = 1\n\nYou are an expert Python programmer, and', 'x = 1\n\n'),
    ('x = 1', 'x = 1'),
  ],
)
def test_truncate_at_the_end_marker(text, cut):
  assert harness.truncate(text, mbpp.STOP_SEQUENCES) == cut


def _write(tmp_path, lines):
  path = tmp_path / 'mbpp.jsonl'
  path.write_text(''.join(line + '\n' for line in lines))
  return path


def _good_lines(count=12):
  return [json.dumps(TASKS[task_id]) for task_id in range(1, count + 1)]


def test_a_bad_json_line_is_named(tmp_path):
  lines = _good_lines()
  lines[6] = lines[6][:-1]  # the closing brace
  with pytest.raises(mbpp.MBPPError, match=r'mbpp\.jsonl:7: not a JSON line'):
    mbpp.load(_write(tmp_path, lines))


@pytest.mark.parametrize('field', ['text', 'code', 'test_list', 'task_id', 'test_setup_code'])
def test_a_missing_field_is_named_with_its_line(tmp_path, field):
  lines = _good_lines()
  record = json.loads(lines[4])
  del record[field]
  lines[4] = json.dumps(record)
  with pytest.raises(mbpp.MBPPError, match=rf'mbpp\.jsonl:5: missing field\(s\) {field}$'):
    mbpp.evaluate_mbpp(_reference, data_path=_write(tmp_path, lines))


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('task_id', '5', 'task_id must be an integer'),
    ('test_list', 'assert True', 'test_list must be a non-empty list of strings'),
    ('test_list', [], 'test_list must be a non-empty list of strings'),
    ('code', None, 'code must be a string'),
  ],
)
def test_a_wrong_field_type_is_named_with_its_line(tmp_path, field, value, message):
  lines = _good_lines()
  lines[2] = json.dumps({**json.loads(lines[2]), field: value})
  with pytest.raises(mbpp.MBPPError, match=rf'mbpp\.jsonl:3: {message}'):
    mbpp.load(_write(tmp_path, lines))


def test_a_repeated_task_id_is_named_with_its_line(tmp_path):
  lines = _good_lines()
  lines.append(lines[0])
  with pytest.raises(mbpp.MBPPError, match=r'mbpp\.jsonl:13: task_id 1 appears twice'):
    mbpp.load(_write(tmp_path, lines))


def test_a_wrong_checksum_is_refused(tmp_path):
  # Each line of the release is json.dumps of its record, so this is the same file.
  path = _write(tmp_path, _good_lines(974))
  assert mbpp.load(path, sha256=mbpp.SHA256) == TASKS
  lines = _good_lines(974)
  lines[40] = lines[40].replace('Write a', 'Write  a', 1)
  path = _write(tmp_path, lines)
  actual = hashlib.sha256(path.read_bytes()).hexdigest()
  with pytest.raises(
    mbpp.MBPPError, match=rf'mbpp\.jsonl: sha256 is {actual}, expected {mbpp.SHA256}'
  ):
    mbpp.evaluate_mbpp(_reference, data_path=path, sha256=mbpp.SHA256)
  assert mbpp.load(path)[41]['text'].startswith('Write  a')  # no checksum asked: read


def test_a_file_short_of_the_split_or_the_shots_is_refused(tmp_path):
  short = _write(tmp_path, _good_lines(500))
  with pytest.raises(mbpp.MBPPError, match=r"split 'test' lacks 10 task\(s\): \[501,"):
    mbpp.evaluate_mbpp(_reference, data_path=short)
  no_shots = _write(tmp_path, [json.dumps(t) for t in TASKS.values() if t['task_id'] != 3])
  with pytest.raises(mbpp.MBPPError, match=r'no few-shot task\(s\) \[3\]'):
    mbpp.evaluate_mbpp(_reference, data_path=no_shots, task_ids=[11])


def test_tests_that_do_not_parse_are_named_before_any_generation(tmp_path):
  lines = [json.dumps(TASKS[task_id]) for task_id in range(1, 511)]
  broken = dict(TASKS[11], test_list=['assert remove_Occ("hello","l") == "heo"', 'assert ('])
  lines[10] = json.dumps(broken)
  asked = []
  with pytest.raises(mbpp.MBPPError, match=r'task 11: its tests do not parse'):
    mbpp.evaluate_mbpp(
      lambda prompts: asked.extend(prompts) or [''] * len(prompts),
      data_path=_write(tmp_path, lines),
      task_ids=[11],
    )
  assert asked == []
