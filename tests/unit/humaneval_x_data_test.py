"""The shipped HumanEval-X files are the release's, and the loader refuses any others by name."""

import gzip
import hashlib
import json
import re
import shutil

import pytest

from clm_jax.eval import humaneval_x


def test_each_shipped_file_has_the_release_checksum_the_readme_lists():
  readme = (humaneval_x.DATA_DIR / 'README.md').read_text()
  listed = dict(
    (name, digest) for digest, name in re.findall(r'^([0-9a-f]{64})  (\S+)$', readme, re.M)
  )
  assert listed == humaneval_x.SHA256
  for name, digest in humaneval_x.SHA256.items():
    assert hashlib.sha256((humaneval_x.DATA_DIR / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize('language', humaneval_x.LANGUAGES)
def test_each_language_has_the_164_problems_in_order(language):
  problems = humaneval_x.load(language)
  prefix = humaneval_x.FILES[language][1]
  assert list(problems) == [f'{prefix}/{i}' for i in range(164)]
  for problem in problems.values():
    assert all(isinstance(problem[field], str) for field in humaneval_x.FIELDS)
    assert problem['canonical_solution'].strip()


def test_problems_are_the_same_164_in_every_language():
  # Task 0 is the same problem everywhere: its tests name the same numbers.
  for language in humaneval_x.LANGUAGES:
    problem = humaneval_x.load(language)[f'{humaneval_x.FILES[language][1]}/0']
    assert '0.3' in problem['test'] and '0.05' in problem['test'], language


def _copy(tmp_path, language='cpp'):
  name = humaneval_x.path_of(language).name
  shutil.copy(humaneval_x.path_of(language), tmp_path / name)
  return tmp_path / name


def _rewrite(path, edit):
  lines = gzip.decompress(path.read_bytes()).decode().split('\n')
  path.write_bytes(gzip.compress('\n'.join(edit(lines)).encode()))


def test_a_changed_file_is_refused_by_its_checksum(tmp_path):
  path = _copy(tmp_path)
  _rewrite(path, lambda lines: [lines[0].replace('threshold', 'limit', 1), *lines[1:]])
  with pytest.raises(humaneval_x.HumanEvalXError, match=r'humaneval_cpp.jsonl.gz: sha256 is'):
    humaneval_x.load('cpp', directory=tmp_path)
  # Unchecked, the same file reads: the change is only what the checksum caught.
  assert 'limit' in humaneval_x.load('cpp', directory=tmp_path, verify=False)['CPP/0']['prompt']


def _record(lines, i, **changes):
  return json.dumps({**json.loads(lines[i]), **changes})


@pytest.mark.parametrize(
  'edit, message',
  [
    (
      lambda lines: lines[:1] + ['{"task_id": '] + lines[2:],
      r'humaneval_cpp.jsonl.gz:2: not a JSON',
    ),
    (lambda lines: lines[:1] + ['[1, 2]'] + lines[2:], r'jsonl.gz:2: expected a JSON object'),
    (
      lambda lines: [_record(lines, 0, test=None), *lines[1:]],
      r'jsonl.gz:1: missing or non-string field\(s\) test',
    ),
    (
      lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
      r"jsonl.gz:2: task_id 'CPP/2', expected 'CPP/1'",
    ),
    (lambda lines: lines[:100], r'humaneval_cpp.jsonl.gz: 100 problems, expected 164'),
  ],
)
def test_a_malformed_file_is_named_by_line(tmp_path, edit, message):
  path = _copy(tmp_path)
  _rewrite(path, edit)
  with pytest.raises(humaneval_x.HumanEvalXError, match=message):
    humaneval_x.load('cpp', directory=tmp_path, verify=False)


def test_a_file_that_is_not_gzip_is_named(tmp_path):
  (tmp_path / 'humaneval_go.jsonl.gz').write_text('{"task_id": "Go/0"}\n')
  with pytest.raises(humaneval_x.HumanEvalXError, match='humaneval_go.jsonl.gz: not a gzipped'):
    humaneval_x.load('go', directory=tmp_path, verify=False)


def test_an_unknown_language_is_named():
  with pytest.raises(humaneval_x.HumanEvalXError, match="'rust'"):
    humaneval_x.load('rust')
