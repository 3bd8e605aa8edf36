"""Tests of clm_jax.data.tokenizer: lossless round trips, special ids, caching."""

import concurrent.futures
import os
import pathlib
import random

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from clm_jax.config import schema
from clm_jax.data import sources
from clm_jax.data import tokenizer

VOCAB = 512  # Tiny, so training on 1 MiB of the stdlib takes well under a second.


def _data_config(**overrides):
  c_data = schema.get_config().data
  c_data.tokenizer_sample_mb = 1
  for key, value in overrides.items():
    c_data[key] = value
  return c_data


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tokenizers')


@pytest.fixture(scope='module')
def tok(cache_dir):
  return tokenizer.for_corpus(_data_config(), VOCAB, cache_dir=cache_dir)


TRICKY = [
  '',
  ' ',
  '   leading and trailing   ',
  '\tdef f():\n\t\treturn 1\n',
  'windows\r\nline\r\nends\r\n',
  'old mac\rends',
  '\n\n\n\nblank lines\n\n\n',
  'x' * 10_000,
  ' ' * 37 + '\t' * 5 + ' ' * 3,
  '\u2581',  # sentencepiece's own space symbol, literally
  '\u2581\u2581 a\u2581b \u2581',
  'emoji 😀🐍👩‍💻 ünïcödé 中文 русский',
  'e\u0301 ﬁ ｆｕｌｌ１２３ Ⅻ',  # NFKC would fold these.
  '\x01\x02\x1b[0m\x7f\x0b\x0c\u2028\u2029\ufeff',
  bytes(range(1, 256)).decode('latin-1'),
  '<PRE><SUF><MID><EOT><s></s><pad><unk> ▁<PRE>',
  '# -*- coding: utf-8 -*-\nprint("hi")  # trailing  \n',
]


@pytest.mark.parametrize('text', TRICKY)
def test_round_trip_is_byte_exact(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.unk_id not in ids
  assert all(0 <= i < tok.vocab_size for i in ids)


def test_round_trip_on_every_stdlib_file(tok):
  files = sources.list_files(_data_config())
  assert len(files) > 1000

  def round_trips(path):
    text = sources.read_text(path)
    return tok.decode(tok.encode(text)) == text

  # sentencepiece releases the GIL, so threads use every core.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    failed = [p for p, ok in zip(files, pool.map(round_trips, files), strict=True) if not ok]
  assert not failed


def test_random_unicode_never_maps_to_unk(tok):
  rng = np.random.default_rng(0)
  code_points = rng.integers(1, 0x110000, size=4000)
  # Surrogates cannot be UTF-8 encoded, so no str a file holds contains them.
  chars = [chr(c) for c in code_points if not 0xD800 <= c < 0xE000]
  for start in range(0, len(chars), 200):
    text = ''.join(chars[start : start + 200])
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_digits_are_single_pieces(tok):
  assert [tok.id_to_piece(i) for i in tok.encode('12345')] == list('12345')
  pieces = [tok.id_to_piece(i) for i in tok.encode('x = 2024.5')]
  assert [p for p in pieces if any(ch.isdigit() for ch in p)] == list('20245')


def test_digits_never_merge_even_when_frequent(tmp_path):
  rng = random.Random(0)
  words = ['alpha', 'beta', '12345', '2024', '\n']
  text = ' '.join(rng.choice(words) for _ in range(20_000))
  trained = tokenizer.train([text], tmp_path / 'digits.model', 295)
  pieces = [trained.id_to_piece(i) for i in trained.encode('12345 2024 alpha')]
  # Merges were learned ('▁alpha'), just never across digits.
  assert pieces == [*'12345', '\u2581', *'2024', '\u2581alpha']


def test_special_ids(tok):
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
  assert tok.sentinels == {'prefix': 4, 'suffix': 5, 'middle': 6, 'eot': 7}
  assert tok.vocab_size == VOCAB
  expected = {
    1: '<s>',
    2: '</s>',
    3: '<pad>',
    4: '<PRE>',
    5: '<SUF>',
    6: '<MID>',
    7: '<EOT>',
  }
  assert {i: tok.id_to_piece(i) for i in expected} == expected


def test_sentinel_text_does_not_forge_sentinels(tok):
  text = 'a = "<PRE>" + "<EOT>"'
  ids = tok.encode(text)
  specials = {*tok.sentinels.values(), tok.bos_id, tok.eos_id, tok.pad_id}
  assert not specials & set(ids)
  # Control ids vanish on decode, so a FIM document decodes to its text.
  framed = [tok.bos_id, tok.sentinels['prefix'], *ids, tok.eos_id, tok.pad_id]
  assert tok.decode(framed) == text


@pytest.mark.parametrize('width', [4, 8])
def test_indentation_run_is_one_piece(tok, width):
  ids = tok.encode(' ' * width)
  assert [tok.id_to_piece(i) for i in ids] == ['\u2581' * width]
  first = tok.encode(' ' * width + 'return x\n')[0]
  assert tok.id_to_piece(first) == '\u2581' * width


def test_newline_pieces_are_learned(tok):
  pieces = {tok.id_to_piece(i) for i in range(tok.vocab_size)}
  assert {'\n', '\n\n', ':\n', ')\n'} <= pieces


def test_load_gives_the_same_model(tok):
  loaded = tokenizer.load(tok.path)
  text = 'def f(x):\n    return x ** 2  # ▁\n'
  assert loaded.encode(text) == tok.encode(text)
  assert loaded.vocab_size == tok.vocab_size


def test_load_missing_file_names_the_path(tmp_path):
  path = tmp_path / 'nope.model'
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizer.load(path)


@pytest.mark.parametrize('data', [b'', b'not a model at all\x00\xff'])
def test_load_corrupt_file_names_the_path(tmp_path, data):
  path = tmp_path / 'corrupt.model'
  path.write_bytes(data)
  with pytest.raises(ValueError, match='corrupt.model'):
    tokenizer.load(path)


def test_load_finds_codellama_style_sentinels(tok, tmp_path):
  # CodeLlama's tokenizer.model names its sentinels with a space prefix.
  proto = sentencepiece_model_pb2.ModelProto.FromString(pathlib.Path(tok.path).read_bytes())
  proto.pieces[4].piece = '\u2581<PRE>'
  proto.pieces[5].piece = 'not a sentinel'
  path = tmp_path / 'codellama.model'
  path.write_bytes(proto.SerializeToString())
  loaded = tokenizer.load(path)
  assert loaded.sentinels == {'prefix': 4, 'suffix': None, 'middle': 6, 'eot': 7}


def test_load_llama_style_model(tok, tmp_path):
  # LLaMA-2's tokenizer.model: a dummy-prefix ' ', no pad, no sentinels.
  proto = sentencepiece_model_pb2.ModelProto.FromString(pathlib.Path(tok.path).read_bytes())
  proto.normalizer_spec.add_dummy_prefix = True
  proto.trainer_spec.pad_id = -1
  for i in range(3, 8):
    proto.pieces[i].piece = f'<unused{i}>'
  path = tmp_path / 'llama.model'
  path.write_bytes(proto.SerializeToString())
  loaded = tokenizer.load(path)
  assert loaded.pad_id == loaded.unk_id == 0
  assert loaded.sentinels == dict.fromkeys(('prefix', 'suffix', 'middle', 'eot'))
  text = 'def f(x):\n    return x\n'
  ids = loaded.encode(text)
  assert loaded.id_to_piece(ids[0]).startswith('\u2581')  # The dummy prefix.
  assert loaded.decode(ids) == text


def test_for_corpus_loads_the_cache_without_training(tok, cache_dir, capsys):
  mtime = os.stat(tok.path).st_mtime_ns
  again = tokenizer.for_corpus(_data_config(), VOCAB, cache_dir=cache_dir)
  assert again.path == tok.path
  assert os.stat(tok.path).st_mtime_ns == mtime
  assert 'Training' not in capsys.readouterr().out
  assert sorted(p.name for p in pathlib.Path(cache_dir).iterdir()) == [pathlib.Path(tok.path).name]


def test_cache_key_changes_with_what_changes_the_model(tok, tmp_path):
  root = sources.corpus_root(_data_config())
  keys = {
    tokenizer._cache_key(_data_config(), root, VOCAB),
    tokenizer._cache_key(_data_config(), root, VOCAB + 1),
    tokenizer._cache_key(_data_config(tokenizer_sample_mb=2), root, VOCAB),
    tokenizer._cache_key(_data_config(heldout_fraction=0.1), root, VOCAB),
    tokenizer._cache_key(_data_config(), tmp_path, VOCAB),
  }
  assert len(keys) == 5
  assert pathlib.Path(tok.path).stem in keys


def test_for_corpus_with_a_given_tokenizer(tok):
  c_data = _data_config(tokenizer=tok.path)
  assert tokenizer.for_corpus(c_data, VOCAB).path == tok.path
  with pytest.raises(ValueError, match=r'data\.tokenizer.*model\.vocab_size'):
    tokenizer.for_corpus(c_data, VOCAB - 1)


def test_failed_training_leaves_no_file(tmp_path):
  path = tmp_path / 'small.model'
  with pytest.raises(ValueError, match='300-piece'):
    tokenizer.train(['x = 1\n'] * 10, path, 300)
  assert list(tmp_path.iterdir()) == []


def test_long_lines_are_cut_not_skipped(tmp_path):
  # One 40 KB line: sentencepiece would skip it whole as over-long.
  line = 'abcdefgh' * 5000
  trained = tokenizer.train([line] * 2, tmp_path / 'long.model', 280)
  assert trained.id_to_piece(trained.encode('abcdefgh')[0]) != '<0x61>'
  assert [p.name for p in tmp_path.iterdir()] == ['long.model']


def test_sample_is_bounded_and_independent_of_order():
  texts = [f'def f{i}():\n  return {i}\n' * (1 + i % 13) for i in range(500)]
  max_bytes = 20_000
  sample = tokenizer.sample_texts(iter(texts), max_bytes)
  assert sum(len(t.encode()) for t in sample) <= max_bytes
  assert len(sample) > 50
  shuffled = random.Random(0).sample(texts, len(texts))
  assert tokenizer.sample_texts(shuffled, max_bytes) == sample
  # Bottom-k by hash: everything kept hashes below everything left out.
  key = lambda t: sources.unit_hash(t, 'tokenizer-sample')  # noqa: E731
  assert max(map(key, sample)) < min(key(t) for t in texts if t not in sample)


def test_train_on_inputs_reads_trees_and_dumps_skipping_bad_input(tmp_path, capsys):
  root = pathlib.Path(sources.corpus_root(_data_config()))
  tree = tmp_path / 'tree'
  tree.mkdir()
  for path in sorted(root.glob('*.py'))[:40]:
    (tree / path.name).write_bytes(path.read_bytes())
  (tree / 'bad.py').write_bytes(b'\xff\xfe not utf-8')
  dump = tmp_path / 'dump.jsonl'
  dump.write_text('{"content": "package main\\nfunc main() {}\\n", "language": "Go"}\n{oops\n')
  tok = tokenizer.train_on_inputs(
    [str(tree), str(dump)], tmp_path / 'code.model', 600, sample_mb=0.5, verbose=False
  )
  assert tok.vocab_size == 600
  text = (tree / 'abc.py').read_text()
  assert tok.decode(tok.encode(text)) == text
  with pytest.raises(ValueError, match='no usable document'):
    tokenizer.train_on_inputs([str(dump)], tmp_path / 'x.model', 600, sample_mb=0, verbose=False)
