"""Tests of clm_jax.data.fim: layouts, round trips, rates and determinism."""

import itertools
import math
import pathlib
import sysconfig
import types

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from clm_jax.config import schema
from clm_jax.data import fim
from clm_jax.data import sources
from clm_jax.data import tokenizer

VOCAB = 512
NUM_STDLIB_FILES = 50
ROLES = ('prefix', 'suffix', 'middle', 'eot')

TRICKY = [
  '',
  'x',
  '\n',
  '😀',
  'emoji 😀🐍👩‍💻 ünïcödé 中文',
  'e\u0301\u0301 combining',
  'windows\r\nline\r\nends\r\n',
  '\r\n',
  '\u2581 sentencepiece space \u2581',
  'a = "<PRE>" + "<SUF>" + "<MID>" + "<EOT>"  # literal sentinel text\n',
  '\tdef f():\n\t\treturn 1\n\n\n',
]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  c_data = schema.get_config().data
  c_data.tokenizer_sample_mb = 1
  return tokenizer.for_corpus(c_data, VOCAB, cache_dir=tmp_path_factory.mktemp('tok'))


@pytest.fixture(scope='module')
def stdlib_texts():
  paths = sorted(pathlib.Path(sysconfig.get_paths()['stdlib']).glob('*.py'))
  texts = [sources.read_text(p) for p in paths[:NUM_STDLIB_FILES]]
  assert len(texts) == NUM_STDLIB_FILES
  return texts


def _cuts(seed, n):
  """The cut positions permute() must use: the generator's first 2 doubles."""
  u = np.random.default_rng(seed).random(2)
  return sorted(min(math.floor(x * (n + 1)), n) for x in u)


def _expected(text, seed, tok, *, spm):
  lo, hi = _cuts(seed, len(text))
  p, m, s = text[:lo], text[lo:hi], text[hi:]
  pre, suf, mid, eot = (tok.sentinels[r] for r in ROLES)
  enc, frag = tok.encode, tok.encode_fragment
  if spm:
    return [pre, suf, *frag(s), mid, *enc(p + m), eot]
  return [pre, *enc(p), suf, *frag(s), mid, *frag(m), eot]


def _psm_parts(ids, tok):
  """(prefix, middle, suffix) text of a PSM sequence, read independently of fim."""
  ids = list(ids)
  pre, suf, mid, eot = (tok.sentinels[r] for r in ROLES)
  assert ids[0] == pre and ids[-1] == eot
  i, j = ids.index(suf), ids.index(mid)
  return tok.decode(ids[1:i]), tok.decode(ids[j + 1 : -1]), tok.decode(ids[i + 1 : j])


def test_hand_checked_psm_and_spm_layout(tok):
  text = 'def add(a, b):\n  return a + b\n'
  # Seed 7's first two doubles, 0.625 and 0.897, times len + 1 = 31: cuts 19, 27.
  assert _cuts(7, len(text)) == [19, 27]
  p, m, s = 'def add(a, b):\n  re', 'turn a +', ' b\n'
  assert p + m + s == text
  enc = tok.encode
  pre, suf, mid, eot = (tok.sentinels[r] for r in ROLES)

  psm = fim.permute(text, np.random.default_rng(7), tok, spm_rate=0.0)
  assert psm.dtype == np.int32
  assert psm.tolist() == [pre, *enc(p), suf, *enc(s), mid, *enc(m), eot]

  spm = fim.permute(text, np.random.default_rng(7), tok, spm_rate=1.0)
  assert spm.tolist() == [pre, suf, *enc(s), mid, *enc(p + m), eot]

  assert fim.restore(psm, tok) == fim.restore(spm, tok) == text


@pytest.mark.parametrize('spm', [False, True], ids=['psm', 'spm'])
def test_stdlib_files_round_trip(tok, stdlib_texts, spm):
  for seed, text in enumerate(stdlib_texts):
    ids = fim.permute(text, np.random.default_rng(seed), tok, spm_rate=float(spm))
    assert ids.tolist() == _expected(text, seed, tok, spm=spm), seed
    assert fim.restore(ids, tok) == text, seed
    # Exactly one of each sentinel: encoding a part can never forge one.
    for role in ROLES:
      assert (ids == tok.sentinels[role]).sum() == 1


@pytest.mark.parametrize('spm', [False, True], ids=['psm', 'spm'])
@pytest.mark.parametrize('text', TRICKY)
def test_tricky_texts_round_trip(tok, text, spm):
  for seed in range(20):
    ids = fim.permute(text, np.random.default_rng(seed), tok, spm_rate=float(spm))
    assert ids.tolist() == _expected(text, seed, tok, spm=spm)
    assert fim.restore(ids, tok) == text


def test_empty_text_gives_bare_sentinels(tok):
  pre, suf, mid, eot = (tok.sentinels[r] for r in ROLES)
  rng = np.random.default_rng(0)
  assert fim.permute('', rng, tok, spm_rate=0.0).tolist() == [pre, suf, mid, eot]
  assert fim.permute('', rng, tok, spm_rate=1.0).tolist() == [pre, suf, mid, eot]
  assert fim.restore([pre, suf, mid, eot], tok) == ''


def test_every_cut_occurs_including_the_ends(tok):
  # Two code points of 4 UTF-8 bytes and a CRLF: cuts inside any of them
  # would break the round trip or never be seen.
  text = '😀a🐍\r\n'
  n = len(text)
  seen = set()
  for seed in range(600):
    ids = fim.permute(text, np.random.default_rng(seed), tok, spm_rate=0.0)
    p, m, s = _psm_parts(ids, tok)
    assert p + m + s == text
    seen.add((len(p), len(p) + len(m)))
  assert seen == {(lo, hi) for lo in range(n + 1) for hi in range(lo, n + 1)}


def test_cuts_are_independent_uniform_positions(tok):
  # Sorted independent uniforms over the n + 1 cut points give an empty
  # middle with probability 1 / (n + 1) and an empty suffix (hi == n) with
  # probability (2n + 1) / (n + 1)^2; sampling two distinct positions or
  # excluding the ends would miss these.
  text = 'abcdefghi'
  n, trials = len(text), 4000
  rng = np.random.default_rng(123)
  empty_middle = empty_suffix = 0
  for _ in range(trials):
    p, m, s = _psm_parts(fim.permute(text, rng, tok, spm_rate=0.0), tok)
    empty_middle += not m
    empty_suffix += not s
  _assert_binomial(empty_middle, trials, 1 / (n + 1))
  _assert_binomial(empty_suffix, trials, (2 * n + 1) / (n + 1) ** 2)


def _assert_binomial(count, trials, p):
  """count is within 5 standard deviations of trials * p."""
  sd = math.sqrt(trials * p * (1 - p))
  assert abs(count - trials * p) <= 5 * sd + 1e-9, (count, trials * p, sd)


def _short_docs(tok, count):
  # All the same length, so the chance of a PSM with an empty prefix (whose
  # ids look like SPM) is the same for each.
  return [np.asarray(tok.encode(f'x_{i:05d} = f({i % 97:02d})\n'), np.int32) for i in range(count)]


@pytest.mark.parametrize('fim_rate', [0.0, 0.1, 0.5, 0.9, 1.0])
def test_fim_rate_and_spm_rate_frequencies(tok, fim_rate):
  docs = _short_docs(tok, 2000)
  n = len(tok.decode(docs[0]))
  rng = np.random.default_rng(42)
  transformed = spm_like = 0
  for doc in docs:
    out = fim.maybe_permute(doc, rng, tok, fim_rate=fim_rate)
    assert out.dtype == np.int32
    if out[0] == tok.sentinels['prefix']:
      transformed += 1
      spm_like += out[1] == tok.sentinels['suffix']
      assert fim.restore(out, tok) == tok.decode(doc)
    else:
      np.testing.assert_array_equal(out, doc)
  _assert_binomial(transformed, len(docs), fim_rate)
  if transformed:
    # SPM, or PSM whose prefix came out empty (first cut at 0).
    p_empty_prefix = (2 * n + 1) / (n + 1) ** 2
    _assert_binomial(spm_like, transformed, 0.5 + 0.5 * p_empty_prefix)


def test_fim_rate_zero_returns_the_input_exactly(tok, stdlib_texts):
  rng = np.random.default_rng(0)
  for text in stdlib_texts[:10]:
    doc = np.asarray(tok.encode(text), np.int32)
    out = fim.maybe_permute(doc, rng, tok, fim_rate=0.0)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, doc)
  # Lists come back as int32 arrays too.
  out = fim.maybe_permute([8, 9, 10], rng, tok, fim_rate=0.0)
  assert out.dtype == np.int32 and out.tolist() == [8, 9, 10]


def test_fim_rate_one_is_permute_after_one_draw(tok, stdlib_texts):
  for seed, text in enumerate(stdlib_texts[:10]):
    doc = np.asarray(tok.encode(text), np.int32)
    out = fim.maybe_permute(doc, np.random.default_rng(seed), tok, fim_rate=1.0)
    rng = np.random.default_rng(seed)
    rng.random()
    np.testing.assert_array_equal(out, fim.permute(text, rng, tok))
    assert fim.restore(out, tok) == text


def test_empty_document_is_unchanged(tok):
  rng = np.random.default_rng(0)
  out = fim.maybe_permute(np.zeros(0, np.int32), rng, tok, fim_rate=1.0)
  assert out.dtype == np.int32 and out.shape == (0,)


def test_draws_do_not_depend_on_the_outcome(tok, stdlib_texts):
  docs = [np.zeros(0, np.int32), *_short_docs(tok, 3)]
  docs += [np.asarray(tok.encode(t), np.int32) for t in stdlib_texts[:3]]
  states = set()
  for fim_rate, spm_rate in itertools.product([0.0, 0.3, 1.0], [0.0, 1.0]):
    rng = np.random.default_rng(5)
    for doc in docs:
      fim.maybe_permute(doc, rng, tok, fim_rate=fim_rate, spm_rate=spm_rate)
    states.add(rng.random())
  assert len(states) == 1


def test_same_seed_same_output(tok, stdlib_texts):
  docs = [np.asarray(tok.encode(t), np.int32) for t in stdlib_texts[:20]]

  def run(seed):
    rng = np.random.default_rng(seed)
    return [fim.maybe_permute(d, rng, tok, fim_rate=0.5).tolist() for d in docs]

  assert run(1) == run(1)
  assert run(1) != run(2)


@pytest.mark.parametrize('rate', [-0.1, 1.5, float('nan')])
def test_rates_are_validated(tok, rate):
  rng = np.random.default_rng(0)
  doc = np.asarray(tok.encode('x = 1\n'), np.int32)
  with pytest.raises(ValueError, match=r'data\.fim_rate='):
    fim.maybe_permute(doc, rng, tok, fim_rate=rate)
  with pytest.raises(ValueError, match=r'data\.fim_spm_rate='):
    fim.maybe_permute(doc, rng, tok, fim_rate=0.5, spm_rate=rate)
  with pytest.raises(ValueError, match=r'data\.fim_spm_rate='):
    fim.permute('x = 1\n', rng, tok, spm_rate=rate)


def test_check_tokenizer_accepts_ours(tok):
  fim.check_tokenizer(tok)


def test_check_tokenizer_names_missing_sentinels():
  fake = types.SimpleNamespace(sentinels=dict.fromkeys(ROLES))
  with pytest.raises(ValueError, match=r'<PRE>, <SUF>, <MID>, <EOT>.*data\.fim_rate=0'):
    fim.check_tokenizer(fake)
  fake = types.SimpleNamespace(sentinels={'prefix': 4, 'suffix': 5, 'middle': 6, 'eot': None})
  with pytest.raises(ValueError, match='sentinel pieces <EOT>,') as e:
    fim.check_tokenizer(fake)
  assert '<PRE>' not in str(e.value)


def test_llama_style_tokenizer_needs_fim_rate_zero(tok, tmp_path):
  # LLaMA-2's tokenizer.model has no infilling pieces.
  proto = sentencepiece_model_pb2.ModelProto.FromString(pathlib.Path(tok.path).read_bytes())
  for i in range(4, 8):
    proto.pieces[i].piece = f'<unused{i}>'
  path = tmp_path / 'llama.model'
  path.write_bytes(proto.SerializeToString())
  llama = tokenizer.load(path)
  assert llama.sentinels == dict.fromkeys(ROLES)
  doc = np.asarray(llama.encode('x = 1\n'), np.int32)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(fim.maybe_permute(doc, rng, llama, fim_rate=0.0), doc)
  with pytest.raises(ValueError, match='llama.model'):
    fim.check_tokenizer(llama)
  # Even where the draw would leave the document alone, so failures are not random.
  with pytest.raises(ValueError, match=r'data\.fim_rate=0'):
    fim.maybe_permute(doc, rng, llama, fim_rate=1e-9)
  with pytest.raises(ValueError, match='<PRE>'):
    fim.permute('x = 1\n', rng, llama)
  assert fim.restore(doc, llama) == 'x = 1\n'


def test_restore_without_sentinels_decodes(tok):
  text = 'print("hi")\n'
  assert fim.restore(tok.encode(text), tok) == text
  assert fim.restore(np.zeros(0, np.int32), tok) == ''


def _malformed(tok):
  pre, suf, mid, eot = (tok.sentinels[r] for r in ROLES)
  a, b, c = tok.encode('a'), tok.encode('b'), tok.encode('c')
  return {
    'no eot': [pre, *a, suf, *c, mid, *b],
    'two pre': [pre, *a, pre, suf, *c, mid, *b, eot],
    'mid before suf': [pre, *a, mid, *b, suf, *c, eot],
    'pre not first': [*a, pre, suf, *c, mid, *b, eot],
    'ids after eot': [pre, *a, suf, *c, mid, *b, eot, *a],
    'lone eot': [*a, eot],
    'bos first': [tok.bos_id, pre, *a, suf, *c, mid, *b, eot],
  }


def test_restore_reads_a_hand_made_psm(tok):
  pre, suf, mid, eot = (tok.sentinels[r] for r in ROLES)
  a, b, c = tok.encode('a'), tok.encode('b'), tok.encode('c')
  assert fim.restore([pre, *a, suf, *c, mid, *b, eot], tok) == 'abc'
  assert fim.restore([pre, suf, *c, mid, *a, *b, eot], tok) == 'abc'


@pytest.mark.parametrize(
  'case',
  [
    'no eot',
    'two pre',
    'mid before suf',
    'pre not first',
    'ids after eot',
    'lone eot',
    'bos first',
  ],
)
def test_restore_rejects_malformed_layouts(tok, case):
  with pytest.raises(ValueError, match='Not a FIM sequence'):
    fim.restore(_malformed(tok)[case], tok)
