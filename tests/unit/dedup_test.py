"""Tests of clm_jax.data.dedup: fingerprints and the Deduplicator on real files."""

import hashlib
import pathlib
import random
import re
import sysconfig

import numpy as np
import pytest

from clm_jax.data import dedup

REPO = pathlib.Path(__file__).resolve().parents[2]


def _shingles(text, ngram=5):
  """Word n-gram sets computed the obvious way, to check the signatures against."""
  words = [w for w in re.split(r'\W+', text) if w]
  return {tuple(words[i : i + ngram]) for i in range(max(len(words) - ngram + 1, 1))}


def _jaccard(a, b):
  a, b = _shingles(a), _shingles(b)
  return len(a & b) / len(a | b)


def _estimated_jaccard(a, b):
  return float(np.mean(dedup.signature(a) == dedup.signature(b)))


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


def _half_replaced(text, other):
  """text with its second half of lines replaced by lines of another file."""
  lines, others = text.splitlines(True), other.splitlines(True)
  half = len(lines) // 2
  return ''.join(lines[:half] + others[: len(lines) - half])


_NEAR_COPIES = {'rename': _rename_identifiers, 'comment': _add_comment, 'reformat': _reformat}


def test_content_hash_is_sha256_of_the_utf8_bytes():
  text = 'def naïve():\n  return "ü"\n'
  assert dedup.content_hash(text) == hashlib.sha256(text.encode('utf-8')).digest()
  assert dedup.content_hash(text) != dedup.content_hash(text + '\n')
  assert len(dedup.content_hash('')) == 32


def test_signature_shape_and_dtype():
  sig = dedup.signature('def f(x):\n  return x + 1\n')
  assert sig.dtype == np.uint64 and sig.shape == (128,)
  assert dedup.signature('a b c', num_perm=64).shape == (64,)
  with pytest.raises(ValueError, match='ngram'):
    dedup.signature('a b c', ngram=0)


def test_signature_words_ignore_formatting():
  a = 'def add(a, b):\n    return a + b\n'
  b = 'def add( a,b ) :\n\treturn a+b'
  assert np.array_equal(dedup.signature(a), dedup.signature(b))
  assert not np.array_equal(dedup.signature(a), dedup.signature(a.replace('add', 'sub')))
  # Fewer words than a shingle: the whole word sequence is the one shingle.
  assert np.array_equal(dedup.signature('x = 1'), dedup.signature('x=1\n'))
  assert not np.array_equal(dedup.signature('x = 1'), dedup.signature('x = 2'))
  # Word order matters.
  assert not np.array_equal(dedup.signature('a b c d e'), dedup.signature('e d c b a'))


def test_signature_estimates_jaccard(stdlib_files):
  names = sorted(stdlib_files)
  errors = []
  for i, name in enumerate(names[:10]):
    text = stdlib_files[name]
    for variant in (_rename_identifiers(text), _half_replaced(text, stdlib_files[names[-1 - i]])):
      errors.append(abs(_estimated_jaccard(text, variant) - _jaccard(text, variant)))
  # 128 permutations: standard error sqrt(J (1 - J) / 128), at most 0.044.
  assert np.mean(errors) < 0.06, errors
  assert max(errors) < 0.2, errors


def test_deduplicator_flags_exactly_the_copies(stdlib_files):
  names = sorted(stdlib_files)
  # The originals are distinct: no pair is anywhere near the threshold.
  shingles = [_shingles(stdlib_files[n]) for n in names]
  for i in range(len(names)):
    for j in range(i):
      assert len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j]) < 0.5
  documents = [(name, stdlib_files[name], None) for name in names]
  for i, name in enumerate(names[:12]):
    text = stdlib_files[name]
    documents.append((f'{name}:exact', text, 'exact_duplicate'))
    kind = list(_NEAR_COPIES)[i % len(_NEAR_COPIES)]
    near = _NEAR_COPIES[kind](text)
    assert near != text and _jaccard(text, near) >= 0.9, (name, kind)
    documents.append((f'{name}:{kind}', near, 'near_duplicate'))
  # Copies always come after their original, otherwise in random order.
  rng = random.Random(0)
  originals, copies = documents[:40], documents[40:]
  rng.shuffle(originals)
  rng.shuffle(copies)
  # A copy of a near copy is byte-identical to an earlier, dropped document.
  near_copy = next(text for _, text, expected in copies if expected == 'near_duplicate')
  copies.append(('copy-of-near', near_copy, 'exact_duplicate'))
  documents.append(copies[-1])
  index = dedup.Deduplicator(threshold=0.85)
  got = {
    key: index.check(key, dedup.content_hash(text), dedup.signature(text))
    for key, text, _ in originals + copies
  }
  assert got == {key: expected for key, _, expected in documents}


def test_threshold_with_half_the_lines_changed(stdlib_files):
  names = sorted(stdlib_files)
  for name, other in [(names[0], names[-1]), (names[5], names[20])]:
    text = stdlib_files[name]
    changed = _half_replaced(text, stdlib_files[other])
    jaccard = _jaccard(text, changed)
    assert 0.2 <= jaccard <= 0.6, (name, jaccard)
    strict = dedup.Deduplicator(threshold=0.85)
    # Well below the Jaccard similarity, even allowing for the estimate's error.
    loose = dedup.Deduplicator(threshold=jaccard - 0.2)
    for index in (strict, loose):
      assert index.check('a', dedup.content_hash(text), dedup.signature(text)) is None
    sig = dedup.signature(changed)
    assert strict.check('b', dedup.content_hash(changed), sig) is None
    assert loose.check('b', dedup.content_hash(changed), sig) == 'near_duplicate'


def test_lsh_candidates_are_verified_against_the_threshold():
  """Signatures sharing a prefix share LSH bands, so each is a candidate of the first."""
  rng = np.random.default_rng(0)
  first = rng.integers(0, 2**63, size=128, dtype=np.uint64)
  index = dedup.Deduplicator(threshold=0.85)
  assert index.check('first', b'0', first) is None
  # 109 of 128 equal values: estimated Jaccard 0.852; 108: 0.844; 64: 0.5.
  for key, equal, expected in [('a', 64, None), ('b', 108, None), ('c', 109, 'near_duplicate')]:
    sig = first.copy()
    sig[equal:] = rng.integers(2**63, 2**64 - 1, size=128 - equal, dtype=np.uint64)
    assert index.check(key, key.encode(), sig) == expected, key


def test_threshold_one_flags_only_equal_signatures():
  index = dedup.Deduplicator(threshold=1.0)
  a = 'def area(w, h):\n  return w * h\n'
  assert index.check('a', dedup.content_hash(a), dedup.signature(a)) is None
  reformatted = a.replace('  return', '\treturn')
  sig = dedup.signature(reformatted)
  assert index.check('b', dedup.content_hash(reformatted), sig) == 'near_duplicate'
  changed = a.replace('w * h', 'w * h / 2')
  assert index.check('c', dedup.content_hash(changed), dedup.signature(changed)) is None


@pytest.mark.parametrize('threshold', [0.0, -0.1, 1.01, float('nan')])
def test_deduplicator_rejects_bad_threshold(threshold):
  with pytest.raises(ValueError, match='threshold'):
    dedup.Deduplicator(threshold=threshold)


def test_deduplicator_rejects_bad_arguments():
  with pytest.raises(ValueError, match='num_perm'):
    dedup.Deduplicator(num_perm=1)
  index = dedup.Deduplicator(num_perm=64)
  text = 'def f():\n  pass\n'
  with pytest.raises(ValueError, match='num_perm=64'):
    index.check('a', dedup.content_hash(text), dedup.signature(text, num_perm=128))
  with pytest.raises(ValueError, match='uint64'):
    index.check('a', dedup.content_hash(text), dedup.signature(text, num_perm=64).astype(float))
  with pytest.raises(TypeError, match='bytes'):
    index.check('a', dedup.content_hash(text).hex(), dedup.signature(text, num_perm=64))
  assert index.check('a', dedup.content_hash(text), dedup.signature(text, num_perm=64)) is None
  other = 'class C:\n  x = 1\n'
  with pytest.raises(ValueError, match='already kept'):
    index.check('a', dedup.content_hash(other), dedup.signature(other, num_perm=64))
