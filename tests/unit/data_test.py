"""Tests of clm_jax.data: corpus files, the split, and packed Grain batches."""

import collections
import json
import pathlib
import random
import sysconfig

import numpy as np
import pytest

from clm_jax.config import schema
from clm_jax.data import fim
from clm_jax.data import loader
from clm_jax.data import prepare
from clm_jax.data import records
from clm_jax.data import sources
from clm_jax.data import tokenizer

SEQ_LEN = 64


def _data_config(**overrides):
  c_data = schema.get_config().data
  for key, value in overrides.items():
    c_data[key] = value
  return c_data


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A small corpus of 40 documents of 1 to ~150 tokens, plus files to skip."""
  root = tmp_path_factory.mktemp('corpus')
  rng = random.Random(0)
  words = [
    'def',
    'return',
    'self',
    'x',
    '    ',
    '\t',
    '\n',
    '(',
    ')',
    ':',
    '1',
    'ü',
    '😀',
  ]
  docs = {}
  for i in range(40):
    rel = f'pkg{i % 3}/mod_{i:02d}.py'
    docs[rel] = f'# {i}\n' + ''.join(rng.choices(words, k=rng.randrange(0, 120)))
    (root / rel).parent.mkdir(exist_ok=True)
    (root / rel).write_text(docs[rel], encoding='utf-8', newline='')
  skipped = {
    'site-packages/third_party.py': b'import os\n',
    'pkg0/dist-packages/vendored.py': b'import os\n',
    'pkg0/latin1.py': 'caf\xe9 = 1\n'.encode('latin-1'),
    'pkg1/huge.py': b'x = 1\n' * 200_000,
    'pkg1/__init__.py': b'\n  \n',
    'pkg2/notes.txt': b'not python\n',
  }
  for rel, data in skipped.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
  return root, docs


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  files = sources.list_files(_data_config())[::20]
  texts = [sources.read_text(path) for path in files]
  return tokenizer.train(texts, tmp_path_factory.mktemp('tok') / 't.model', 512)


def _take(ds, n):
  it = iter(ds)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def _documents(batches):
  """Splits the non-padding token stream of batches at BOS into documents."""
  stream = np.concatenate([b['tokens'][b['segment_ids'] > 0] for b in batches])
  starts = np.flatnonzero(stream == 1)
  assert starts[0] == 0
  return [tuple(doc) for doc in np.split(stream, starts[1:])]


def _expected(tok, texts):
  return [(tok.bos_id, *tok.encode(text), tok.eos_id) for text in texts]


def test_list_files_keeps_only_usable_python_files(corpus):
  root, docs = corpus
  files = sources.list_files(_data_config(path=str(root)))
  assert [p.relative_to(root).as_posix() for p in files] == sorted(docs)
  assert all(p.is_absolute() for p in files)


def test_list_files_defaults_to_this_interpreters_stdlib():
  files = sources.list_files(_data_config())
  root = pathlib.Path(sysconfig.get_paths()['stdlib']).resolve()
  rel = {p.relative_to(root).as_posix() for p in files}
  assert {'os.py', 'json/__init__.py', 'asyncio/tasks.py'} <= rel
  assert len(files) > 500
  assert not any('site-packages' in p.parts for p in files)
  assert [p.relative_to(root).as_posix() for p in files] == sorted(rel)


def test_list_files_errors_name_the_key(tmp_path):
  with pytest.raises(ValueError, match=r"data\.source='github'"):
    sources.list_files(_data_config(source='github'))
  with pytest.raises(FileNotFoundError, match=r'data\.path'):
    sources.list_files(_data_config(path=str(tmp_path / 'missing')))
  with pytest.raises(ValueError, match=r'data\.path.*no usable'):
    sources.list_files(_data_config(path=str(tmp_path)))


def test_split_is_deterministic_disjoint_and_order_free():
  c_data = _data_config()
  root = sources.corpus_root(c_data)
  files = sources.list_files(c_data)
  train, heldout = sources.split_files(files, root, 0.1)
  assert not set(train) & set(heldout)
  assert set(train) | set(heldout) == set(files)
  assert len(heldout) / len(files) == pytest.approx(0.1, abs=0.03)
  shuffled = list(files)
  random.Random(1).shuffle(shuffled)
  train2, heldout2 = sources.split_files(shuffled, root, 0.1)
  assert (set(train2), set(heldout2)) == (set(train), set(heldout))
  # Only the path relative to the root counts: another machine agrees.
  moved = [pathlib.Path('/elsewhere') / p.relative_to(root) for p in files]
  _, heldout3 = sources.split_files(moved, pathlib.Path('/elsewhere'), 0.1)
  assert {p.relative_to('/elsewhere') for p in heldout3} == {p.relative_to(root) for p in heldout}


def test_split_edge_fractions(corpus):
  root, _ = corpus
  files = sources.list_files(_data_config(path=str(root)))
  train, heldout = sources.split_files(files, root, 0.0)
  assert (train, heldout) == (files, [])
  train, heldout = sources.split_files(files, root, 1e-9)
  assert len(heldout) == 1 and len(train) == len(files) - 1
  for bad in (1.0, -0.1):
    with pytest.raises(ValueError, match=r'data\.heldout_fraction'):
      sources.split_files(files, root, bad)


def test_packed_rows_hold_whole_documents_in_order(corpus, tok):
  root, docs = corpus
  # No row shuffle, so documents can be followed across row boundaries.
  c_data = _data_config(path=str(root), heldout_fraction=0.0, streams=1)
  # batch_size=1 drops no row, so every document must come out exactly once.
  ds = loader.make_dataset(
    c_data, tok, seq_len=SEQ_LEN, batch_size=1, split='train', seed=3, repeat=False
  )
  batches = list(ds)
  assert sorted(_documents(batches)) == sorted(_expected(tok, docs.values()))
  assert len(batches) == -(-sum(len(d) for d in _documents(batches)) // SEQ_LEN)
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((1, SEQ_LEN), np.int32) for k in ('tokens', 'segment_ids', 'positions')
    }
    tokens, segs, pos = (batch[k][0] for k in ('tokens', 'segment_ids', 'positions'))
    used = segs > 0
    # Padding only at the end of a row, filled with the pad id.
    assert used[: used.sum()].all()
    assert (tokens[~used] == tok.pad_id).all()
    ids = segs[used]
    assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}
    for s in np.unique(ids):
      in_seg = segs == s
      np.testing.assert_array_equal(pos[in_seg], np.arange(in_seg.sum()))
      # A segment that is not first in its row starts a document; one that is
      # not last ends one: rows break documents only at their edges.
      if s > 1:
        assert tokens[in_seg][0] == tok.bos_id
      if s < ids[-1]:
        assert tokens[in_seg][-1] == tok.eos_id


def test_streams_mix_files_within_a_batch(tmp_path, tok):
  for i in range(8):  # Long files, each thousands of tokens, each with its own name.
    (tmp_path / f'mod{i}.py').write_text(''.join(f'name{i} = {k}\n' for k in range(400)))

  def files_in_first_batch(streams):
    c_data = _data_config(path=str(tmp_path), heldout_fraction=0.0, streams=streams)
    it = iter(
      loader.make_dataset(c_data, tok, seq_len=SEQ_LEN, batch_size=8, split='train', seed=3)
    )
    text = ''.join(tok.decode(row) for row in next(it)['tokens'])
    it.close()
    return sum(f'name{i} ' in text for i in range(8))

  assert files_in_first_batch(8) == 8  # Each row from its own stream of files.
  assert files_in_first_batch(1) == 1  # One stream: the batch is one file.


def test_heldout_keeps_file_order(corpus, tok):
  root, docs = corpus
  c_data = _data_config(path=str(root), heldout_fraction=0.3, streams=1)
  files = sources.list_files(c_data)
  _, heldout = sources.split_files(files, root, 0.3)
  texts = [docs[p.relative_to(root).as_posix()] for p in heldout]
  ds = loader.make_dataset(
    c_data, tok, seq_len=SEQ_LEN, batch_size=1, split='heldout', seed=0, repeat=False
  )
  assert _documents(list(ds)) == _expected(tok, texts)


def test_train_reshuffles_every_epoch(corpus, tok):
  root, docs = corpus
  c_data = _data_config(path=str(root), heldout_fraction=0.0, streams=1)
  ds = loader.make_dataset(c_data, tok, seq_len=SEQ_LEN, batch_size=4, split='train', seed=0)
  found = _documents(_take(ds, 40))
  n = len(docs)
  assert len(found) > 2 * n
  first, second = found[:n], found[n : 2 * n]
  assert sorted(first) == sorted(second) == sorted(_expected(tok, docs.values()))
  assert first != second


def test_seed_fixes_the_batches(corpus, tok):
  root, _ = corpus
  c_data = _data_config(path=str(root))

  def batches(seed):
    ds = loader.make_dataset(c_data, tok, seq_len=SEQ_LEN, batch_size=2, split='train', seed=seed)
    return np.stack([b['tokens'] for b in _take(ds, 5)])

  np.testing.assert_array_equal(batches(7), batches(7))
  assert not np.array_equal(batches(7), batches(8))


def _process_shards(c_data, tok, count):
  """The documents each of `count` processes reads in one pass (one row of a batch each)."""
  c_data = c_data.copy_and_resolve_references()
  c_data.streams = count
  return [
    _documents(
      list(
        loader.make_dataset(
          c_data,
          tok,
          seq_len=SEQ_LEN,
          batch_size=count,
          split='train',
          seed=0,
          rows=(i, i + 1),
          repeat=False,
        )
      )
    )
    for i in range(count)
  ]


def test_process_shards_are_disjoint(corpus, tok):
  root, docs = corpus
  c_data = _data_config(path=str(root), heldout_fraction=0.0)
  shards = _process_shards(c_data, tok, 2)
  assert len(shards[0]) == len(shards[1]) == len(docs) // 2
  everything = collections.Counter(_expected(tok, docs.values()))
  assert collections.Counter(shards[0]) + collections.Counter(shards[1]) == everything


@pytest.mark.parametrize('workers', [0, 2])
def test_process_rows_put_together_are_the_global_batches(corpus, tok, workers):
  """Batches do not depend on the process count: 1, 2 or 4 readers give the same rows."""
  root, _ = corpus
  c_data = _data_config(path=str(root), streams=4, workers=workers, fim_rate=0.5)

  def batches(rows):
    ds = loader.make_dataset(
      c_data, tok, seq_len=SEQ_LEN, batch_size=8, split='train', seed=2, rows=rows
    )
    return _take(ds, 5)

  whole = batches(None)
  # Aligned with the streams (2 rows each), and not: [0, 3) shares stream 1 with [3, 8).
  for split in ([(0, 4), (4, 8)], [(0, 2), (2, 4), (4, 6), (6, 8)], [(0, 3), (3, 8)]):
    parts = [batches(rows) for rows in split]
    for i, want in enumerate(whole):
      for key in want:
        got = np.concatenate([part[i][key] for part in parts])
        np.testing.assert_array_equal(got, want[key])


def _assert_resumes(make, consumed, n):
  """A state saved after `consumed` batches restores to the same next `n` batches."""
  it = iter(make())
  for _ in range(consumed):
    next(it)
  # Checkpoints store the state as JSON; it must survive that.
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(n)]
  it.close()
  resumed = iter(make())
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  resumed.close()


@pytest.mark.parametrize('consumed', [1, 2, 5, 20])
def test_restored_state_resumes_the_same_batches(corpus, tok, consumed):
  root, _ = corpus
  c_data = _data_config(path=str(root))

  def make():
    return loader.make_dataset(c_data, tok, seq_len=SEQ_LEN, batch_size=3, split='train', seed=1)

  # 20: past the first epoch boundary and mid-document.
  _assert_resumes(make, consumed, 6)


def test_make_dataset_rejects_bad_arguments(corpus, tok):
  root, _ = corpus
  c_data = _data_config(path=str(root))
  common = dict(seq_len=SEQ_LEN, batch_size=1, seed=0)
  with pytest.raises(ValueError, match='split'):
    loader.make_dataset(c_data, tok, split='test', **common)
  with pytest.raises(ValueError, match=r'rows=\[1, 3\)'):
    loader.make_dataset(c_data, tok, split='train', rows=(1, 3), **common)
  with pytest.raises(ValueError, match='data.streams=3 must divide the batch size 4'):
    bad = _data_config(path=str(root), streams=3)
    loader.make_dataset(bad, tok, split='train', **{**common, 'batch_size': 4})


LANGUAGE_FILES = {'python': 'py', 'go': 'go', 'text': 'md'}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, tok):
  """A prepared directory of 3 languages x 30 distinct documents; {ids: language}."""
  root = tmp_path_factory.mktemp('prepared')
  for language, ext in LANGUAGE_FILES.items():
    for i in range(30):
      lines = ''.join(
        f'def {language}_{i}_{k}(value):\n  return value + {k}\n' for k in range(2 + i % 7)
      )
      (root / 'tree' / language).mkdir(parents=True, exist_ok=True)
      (root / 'tree' / language / f'doc{i}.{ext}').write_text(lines)
  options = prepare.PrepareOptions(heldout_fraction=0.1, near_dup_threshold=0)
  manifest = prepare.prepare([str(root / 'tree')], root / 'out', tok.path, options, progress=False)
  languages = {}
  for split in records.SPLITS:
    for shard in manifest['splits'][split]:
      for record in records.read_shard(root / 'out' / shard['file']):
        ids, meta = records.decode(record, manifest['dtype'])
        languages[(split, (tok.bos_id, *ids, tok.eos_id))] = meta['language']
  assert len(languages) == 90
  return root / 'out', languages


def _prepared_config(path, **overrides):
  return _data_config(source='prepared', path=str(path), **overrides)


def test_prepared_rows_hold_every_document_once(prepared, tok):
  path, languages = prepared
  for split in records.SPLITS:
    ds = loader.make_dataset(
      _prepared_config(path, streams=1),
      tok,
      seq_len=SEQ_LEN,
      batch_size=1,
      split=split,
      seed=0,
      repeat=False,
    )
    want = sorted(doc for s, doc in languages if s == split)
    assert sorted(_documents(list(ds))) == want


def test_mixture_weights_the_languages(prepared, tok):
  path, languages = prepared
  by_doc = {doc: language for (split, doc), language in languages.items() if split == 'train'}
  c_data = _prepared_config(path, streams=1, mixture='python:0.7,go:0.3')
  ds = loader.make_dataset(c_data, tok, seq_len=SEQ_LEN, batch_size=4, split='train', seed=0)
  docs = _documents(_take(ds, 300))[:-1]  # The last may be cut.
  counts = collections.Counter(by_doc[doc] for doc in docs)
  assert set(counts) == {'python', 'go'} and len(docs) > 600
  assert abs(counts['python'] / len(docs) - 0.7) < 0.06


def test_mixture_errors_name_the_language(prepared, tok):
  path, _ = prepared
  common = dict(seq_len=SEQ_LEN, batch_size=1, seed=0, split='train')
  with pytest.raises(ValueError, match=r"names \['java'\]"):
    loader.make_dataset(_prepared_config(path, mixture='java:1'), tok, **common)
  with pytest.raises(ValueError, match='cobol'):
    loader.make_dataset(_prepared_config(path, mixture='cobol:1'), tok, **common)


def test_fim_rows_restore_to_the_documents(prepared, tok):
  path, languages = prepared
  texts = collections.Counter(tok.decode(doc) for (split, doc) in languages if split == 'train')
  c_data = _prepared_config(path, streams=1, fim_rate=1.0)
  ds = loader.make_dataset(
    c_data, tok, seq_len=SEQ_LEN, batch_size=1, split='train', seed=0, repeat=False
  )
  docs = _documents(list(ds))
  assert all(doc[0] == tok.bos_id and doc[-1] == tok.eos_id for doc in docs)
  # CodeLlama's rule: only a document that stays in one row takes its FIM form.
  assert 0 < sum(doc[1] == tok.sentinels['prefix'] for doc in docs) < len(docs)
  assert collections.Counter(fim.restore(doc[1:-1], tok) for doc in docs) == texts
  spm = sum(doc[2] == tok.sentinels['suffix'] for doc in docs)
  assert 0 < spm < len(docs)


def test_prepared_process_shards_are_disjoint_and_cover(prepared, tok):
  path, languages = prepared
  shards = _process_shards(_prepared_config(path, streams=1), tok, 2)
  found = collections.Counter(shards[0]) + collections.Counter(shards[1])
  assert found == collections.Counter(doc for s, doc in languages if s == 'train')


@pytest.mark.parametrize('workers', [0, 2])
def test_prepared_stream_resumes_exactly(prepared, tok, workers):
  path, _ = prepared
  c_data = _prepared_config(path, workers=workers, fim_rate=0.5)

  def make():
    return loader.make_dataset(c_data, tok, seq_len=SEQ_LEN, batch_size=2, split='train', seed=1)

  first = _take(make(), 12)
  for want, got in zip(first, _take(make(), 12), strict=True):  # Deterministic.
    np.testing.assert_array_equal(got['tokens'], want['tokens'])
  _assert_resumes(make, 12, 4)


def test_prepared_data_needs_its_own_tokenizer(prepared, tok, tmp_path):
  path, _ = prepared
  texts = [sources.read_text(p) for p in sources.list_files(_data_config())[:30]]
  other = tokenizer.train(texts, tmp_path / 'other.model', 600)
  with pytest.raises(records.DataError, match='was prepared with its tokenizer.model'):
    loader.make_dataset(
      _prepared_config(path), other, seq_len=SEQ_LEN, batch_size=1, split='train', seed=0
    )


def test_files_source_mixes_a_source_tree_by_extension(prepared, tok):
  path, languages = prepared
  go = {doc for (split, doc), language in languages.items() if language == 'go'}
  c_data = _data_config(
    source='files', path=str(path.parent / 'tree'), heldout_fraction=0.0, mixture='go:1', streams=1
  )
  ds = loader.make_dataset(c_data, tok, seq_len=SEQ_LEN, batch_size=2, split='train', seed=0)
  docs = _documents(_take(ds, 30))[:-1]
  assert docs and set(docs) <= go
  assert len(set(docs)) == len(go)  # 30 batches of 64 tokens pass every go file.
