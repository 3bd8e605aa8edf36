"""Tests of clm_jax.data.dedup: fingerprints and the Deduplicator on real files."""

import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from clm_jax.data import dedup

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def stdlib_files():
  """40 distinct, real modules: the first top-level stdlib files of 8 to 40 KB with 3+ defs."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  files = {}
  for path in sorted(root.glob('*.py')):
    # Underscore modules include build-generated ones (_sysconfigdata_*).
    if path.name.startswith('_') or not 8000 <= path.stat().st_size <= 40000:
      continue
    text = path.read_text('utf-8')
    if len(set(re.findall(r'\bdef (\w+)', text))) >= 3:
      files[path.name] = text
    if len(files) == 40:
      break
  assert len(files) == 40
  return files


def _rename_identifiers(text):
  """Renames 3 functions everywhere they occur."""
  for name in sorted(set(re.findall(r'\bdef ([a-z]\w{3,})', text)))[:3]:
    text = re.sub(rf'\b{name}\b', f'{name}_v2', text)
  return text


def _add_comment(text):
  return '# Vendored from CPython; keep in sync.\n' + text


def _reformat(text):
  """4-space indents to 2, trailing spaces, doubled blank lines: words are unchanged."""
  text = re.sub(r'(?m)^((?:    )+)', lambda m: '  ' * (len(m.group(1)) // 4), text)
  return text.replace('\n\n', '\n\n\n').replace(':\n', ':  \n')


_NEAR_COPIES = {'rename': _rename_identifiers, 'comment': _add_comment, 'reformat': _reformat}


def test_signature_is_the_same_in_another_process(stdlib_files):
  texts = [stdlib_files[min(stdlib_files)], 'x = 1', 'π = 3.14159  # naïve', '']
  script = (
    'import json, sys\n'
    'from clm_jax.data import dedup\n'
    'texts = json.load(sys.stdin)\n'
    'print(json.dumps([dedup.signature(t).tolist() for t in texts]))\n'
  )
  env = dict(os.environ, PYTHONHASHSEED='12345')
  out = subprocess.run(
    [sys.executable, '-c', script],
    input=json.dumps(texts),
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    check=True,
  ).stdout
  for text, values in zip(texts, json.loads(out), strict=True):
    assert np.array_equal(dedup.signature(text), np.array(values, np.uint64))
