"""FIM against CodeLlama's reference, with ids written out by hand.

CodeLlama (paper section 2.3; meta-llama/codellama llama/generation.py and
llama/tokenizer.py) encodes the prefix as a text of its own, the suffix and the
middle without the dummy ' ' a sentencepiece model adds (`encode_infilling`),
SPM's prefix and middle as one text, and applies FIM only "to documents that
are not cut across multiple model contexts". Every expectation below is a list
of pieces typed into this file, read off the two small tokenizers trained here:
'dummy' adds a dummy prefix as LLaMA's does, 'plain' is the project's own kind.
"""

import collections
import io
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from clm_jax.config import schema
from clm_jax.data import fim
from clm_jax.data import loader
from clm_jax.data import tokenizer as tokenizer_lib
from clm_jax.inference import generate
from clm_jax.model import decoder as model_lib
from tests.helpers import models

VOCAB = 360  # 263 special and byte pieces, the corpus's characters, a few merges.
NAMES = ('add', 'sub', 'mul', 'area', 'total', 'count', 'value', 'index')


def _code_text() -> str:
  """About 5.6 KB of Python-like code."""
  out = []
  for i, a in enumerate(NAMES):
    for j, b in enumerate(NAMES):
      out.append(f'def {a}_{b}(x, y):\n    return x + y * {i + j}\n\n')
      out.append(f'    if {a} > {b}:\n        {a} = {b} + 1\n')
  return ''.join(out)


@pytest.fixture(scope='module')
def dummy(tmp_path_factory):
  """A LLaMA-style model: dummy prefix, byte fallback, sentinels stored as '▁<PRE>'."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_code_text().splitlines(keepends=True)),
    model_writer=model,
    vocab_size=VOCAB,
    model_type='bpe',
    add_dummy_prefix=True,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    control_symbols=['▁<PRE>', '▁<SUF>', '▁<MID>', '▁<EOT>'],
    character_coverage=1.0,
    num_threads=1,
    minloglevel=2,
  )
  path = tmp_path_factory.mktemp('dummy') / 'tokenizer.model'
  path.write_bytes(model.getvalue())
  return tokenizer_lib.load(path)


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
  path = tmp_path_factory.mktemp('plain') / 'tokenizer.model'
  return tokenizer_lib.train([_code_text()], path, VOCAB)


@pytest.fixture(scope='module', params=['dummy', 'plain'])
def tok(request):
  return request.getfixturevalue(request.param)


def _name(tok):
  return 'dummy' if 'dummy' in tok.path else 'plain'


def _ids(tok, pieces):
  """Ids of pieces, looked up in the model file itself.

  P S M E stand for the sentinels: '<PRE>' ... in 'plain', '▁<PRE>' ... in
  'dummy' (as in CodeLlama's tokenizer.model).
  """
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  space = '▁' if _name(tok) == 'dummy' else ''
  marks = {'P': '<PRE>', 'S': '<SUF>', 'M': '<MID>', 'E': '<EOT>'}
  ids = []
  for piece in pieces:
    piece = space + marks[piece] if piece in marks else piece
    token_id = sp.piece_to_id(piece)
    assert sp.id_to_piece(token_id) == piece, piece
    ids.append(token_id)
  return ids


def _cut_at(lo, hi, n, spm_layout):
  """A generator whose 3 doubles make fim.permute cut at lo, hi in PSM or SPM."""
  draws = np.array([(lo + 0.5) / (n + 1), (hi + 0.5) / (n + 1), 0.0 if spm_layout else 0.99])
  return types.SimpleNamespace(random=lambda size: draws[:size])


# (prefix, middle, suffix) and each tokenizer's PSM and SPM pieces; P S M E
# are <PRE> <SUF> <MID> <EOT>. Document 0 cuts 'return' in two, which SPM,
# encoding prefix + middle as one text, never does.
DOCS = [
  ('def add(x, y):\n    re', 'turn x', ' + y\n'),
  ('if a > b:\n', '        a = b', ' + 1\n'),
  ('', 'value', ' = 1\n'),
]
LAYOUTS = {
  ('dummy', 'psm'): [
    ['P', '▁def', '▁add', '(', 'x', ',', '▁y', '):', '<0x0A>', '▁▁▁▁', 're']
    + ['S', '▁+', '▁y', '<0x0A>', 'M', 'tu', 'rn', '▁x', 'E'],
    ['P', '▁', 'if', '▁a', '▁>', '▁', 'b', ':', '<0x0A>', 'S', '▁+', '▁', '1', '<0x0A>']
    + ['M', '▁▁▁▁', '▁▁▁▁', 'a', '▁=', '▁', 'b', 'E'],
    ['P', 'S', '▁=', '▁', '1', '<0x0A>', 'M', 'value', 'E'],
  ],
  ('dummy', 'spm'): [
    ['P', 'S', '▁+', '▁y', '<0x0A>', 'M']
    + ['▁def', '▁add', '(', 'x', ',', '▁y', '):', '<0x0A>', '▁▁▁▁', 'return', '▁x', 'E'],
    ['P', 'S', '▁+', '▁', '1', '<0x0A>', 'M']
    + ['▁', 'if', '▁a', '▁>', '▁', 'b', ':', '<0x0A>', '▁▁▁▁', '▁▁▁▁', 'a', '▁=', '▁', 'b', 'E'],
    ['P', 'S', '▁=', '▁', '1', '<0x0A>', 'M', '▁value', 'E'],
  ],
  ('plain', 'psm'): [
    ['P', 'def', '▁add', '(', 'x', ',', '▁y', '):\n', '▁▁▁▁', 're']
    + ['S', '▁+', '▁y', '\n', 'M', 'tu', 'rn', '▁x', 'E'],
    ['P', 'if', '▁a', '▁>', '▁', 'b', ':\n', 'S', '▁+', '▁', '1', '\n']
    + ['M', '▁▁▁▁▁▁▁▁', 'a', '▁=', '▁', 'b', 'E'],
    ['P', 'S', '▁=', '▁', '1', '\n', 'M', 'value', 'E'],
  ],
  ('plain', 'spm'): [
    ['P', 'S', '▁+', '▁y', '\n', 'M']
    + ['def', '▁add', '(', 'x', ',', '▁y', '):\n', '▁▁▁▁', 'return', '▁x', 'E'],
    ['P', 'S', '▁+', '▁', '1', '\n', 'M']
    + ['if', '▁a', '▁>', '▁', 'b', ':\n', '▁▁▁▁▁▁▁▁', 'a', '▁=', '▁', 'b', 'E'],
    ['P', 'S', '▁=', '▁', '1', '\n', 'M', 'value', 'E'],
  ],
}


def test_encode_fragment_drops_the_dummy_prefix(dummy, plain):
  text = ' + 1\n'
  assert dummy.encode(text) == _ids(dummy, ['▁▁', '+', '▁', '1', '<0x0A>'])
  assert dummy.encode_fragment(text) == _ids(dummy, ['▁+', '▁', '1', '<0x0A>'])
  # Plain decoding takes a leading '▁' for the dummy prefix and drops it.
  assert dummy.decode(dummy.encode_fragment(text)) == '+ 1\n'
  assert dummy.decode_fragment(dummy.encode_fragment(text)) == text
  assert plain.encode(text) == plain.encode_fragment(text) == _ids(plain, ['▁+', '▁', '1', '\n'])
  assert plain.decode_fragment(plain.encode_fragment(text)) == text


def test_encode_fragment_is_codellamas_encode_infilling(dummy):
  # CodeLlama's encode_infilling is sp.encode('☺' + s)[2:]: '☺' is 2 pieces
  # there ('▁', '☺'); here it is '▁' and 3 byte pieces, dropped the same way.
  sp = spm.SentencePieceProcessor(model_file=dummy.path)
  assert sp.encode('☺', out_type=str) == ['▁', '<0xE2>', '<0x98>', '<0xBA>']
  text = _code_text()
  fragments = [
    ' ',
    '  x',
    '\n',
    '\n\n    if',
    'ü + 😀',
    *(text[i : i + 37] for i in range(0, 900, 29)),
  ]
  for fragment in fragments:
    assert dummy.encode_fragment(fragment) == sp.encode('☺' + fragment)[4:], repr(fragment)
    assert dummy.decode_fragment(dummy.encode_fragment(fragment)) == fragment


@pytest.mark.parametrize('layout', ['psm', 'spm'])
def test_training_layout_is_the_reference(tok, layout):
  name = _name(tok)
  for (prefix, middle, suffix), pieces in zip(DOCS, LAYOUTS[(name, layout)], strict=True):
    text = prefix + middle + suffix
    rng = _cut_at(len(prefix), len(prefix) + len(middle), len(text), layout == 'spm')
    got = fim.permute(text, rng, tok, spm_rate=0.5)
    assert got.tolist() == _ids(tok, pieces), repr(text)
    # maybe_permute reads the document's ids back to text first.
    rng = types.SimpleNamespace(random=lambda size, rng=rng: np.r_[0.0, rng.random(3)][:size])
    again = fim.maybe_permute(np.array(tok.encode(text)), rng, tok, fim_rate=1.0)
    assert again.tolist() == got.tolist()


@pytest.mark.parametrize('layout', ['psm', 'spm'])
def test_restore_reads_the_reference_layouts(dummy, plain, layout):
  for tok, name in ((dummy, 'dummy'), (plain, 'plain')):
    for (prefix, middle, suffix), pieces in zip(DOCS, LAYOUTS[(name, layout)], strict=True):
      assert fim.restore(_ids(tok, pieces), tok) == prefix + middle + suffix


# The infilling prompts of two (prefix, suffix) pairs, [BOS] first.
PROMPTS = [('def area(x, y):\n    ', '\n'), ('if a > b:\n', ' + 1\n')]
PROMPT_PIECES = {
  ('dummy', 'psm'): [
    ['<s>', 'P', '▁def', '▁area', '(', 'x', ',', '▁y', '):', '<0x0A>', '▁▁▁▁']
    + ['S', '<0x0A>', 'M'],
    [
      '<s>',
      'P',
      '▁',
      'if',
      '▁a',
      '▁>',
      '▁',
      'b',
      ':',
      '<0x0A>',
      'S',
      '▁+',
      '▁',
      '1',
      '<0x0A>',
      'M',
    ],
  ],
  ('dummy', 'spm'): [
    ['<s>', 'P', 'S', '<0x0A>', 'M']
    + ['▁def', '▁area', '(', 'x', ',', '▁y', '):', '<0x0A>', '▁▁▁▁'],
    [
      '<s>',
      'P',
      'S',
      '▁+',
      '▁',
      '1',
      '<0x0A>',
      'M',
      '▁',
      'if',
      '▁a',
      '▁>',
      '▁',
      'b',
      ':',
      '<0x0A>',
    ],
  ],
  ('plain', 'psm'): [
    ['<s>', 'P', 'def', '▁area', '(', 'x', ',', '▁y', '):\n', '▁▁▁▁', 'S', '\n', 'M'],
    ['<s>', 'P', 'if', '▁a', '▁>', '▁', 'b', ':\n', 'S', '▁+', '▁', '1', '\n', 'M'],
  ],
  ('plain', 'spm'): [
    ['<s>', 'P', 'S', '\n', 'M', 'def', '▁area', '(', 'x', ',', '▁y', '):\n', '▁▁▁▁'],
    ['<s>', 'P', 'S', '▁+', '▁', '1', '\n', 'M', 'if', '▁a', '▁>', '▁', 'b', ':\n'],
  ],
}


@pytest.mark.parametrize('layout', ['psm', 'spm'])
def test_infill_prompt_is_the_reference(tok, layout):
  name = _name(tok)
  for (prefix, suffix), pieces in zip(PROMPTS, PROMPT_PIECES[(name, layout)], strict=True):
    prompt = generate.format_infill(tok, prefix, suffix, spm=layout == 'spm')
    assert prompt == _ids(tok, pieces), repr(prefix + suffix)


def _bigram_params(cfg, chain):
  """Params under which greedy decoding follows `chain`: chain[i] -> chain[i + 1].

  Zero blocks add nothing to the residual, so the logits are
  norm(embed[last token]) @ lm_head: a bigram table, here with one-hot rows.
  """
  params = jax.tree.map(
    jnp.zeros_like, jax.jit(model_lib.init, static_argnums=0)(cfg, jax.random.key(0))
  )
  params['final_norm']['scale'] = jnp.ones(cfg.d_model)
  embed = np.zeros((cfg.vocab_size, cfg.d_model), np.float32)
  head = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
  for i, (token, following) in enumerate(zip(chain, chain[1:], strict=False)):
    embed[token, i] = 1.0
    head[i, following] = 1.0
  params['embed'], params['lm_head'] = jnp.asarray(embed), jnp.asarray(head)
  return params


@pytest.mark.parametrize('layout', ['psm', 'spm'])
def test_infill_keeps_the_middles_leading_space(dummy, layout):
  cfg = models.tiny_model_config(vocab_size=dummy.vocab_size)
  prefix, suffix = 'def add(x, y):\n    return x', '\n'
  middle = _ids(dummy, ['▁+', '▁y'])  # ' + y', as a fragment.
  prompt = generate.format_infill(dummy, prefix, suffix, spm=layout == 'spm')
  chain = [prompt[-1], *middle, dummy.sentinels['eot']]
  assert len(set(chain)) == len(chain)
  params = _bigram_params(cfg, chain)
  got = generate.infill(cfg, params, dummy, prefix, suffix, spm=layout == 'spm', max_new_tokens=6)
  assert got == ' + y'


def _files_config(root, **overrides):
  c_data = schema.get_config().data
  c_data.update(
    source='files', path=str(root), heldout_fraction=0.0, streams=1, fim_rate=1.0, prefetch=0
  )
  c_data.update(overrides)
  return c_data


def _letter_rows(name):
  """The 10-token rows of one-letter documents at fim_rate 1: FIM'd then plain.

  A one-letter document is [<s>, letter, </s>]; any FIM form of it is 7 ids.
  The first fills 7 slots of a row; the next one's FIM form would cross the
  row's end, so it comes plain and fills the row.
  """
  fim_forms, plain_forms = {}, {}
  for letter in 'axy':
    spaced = letter if name == 'plain' else '▁' + letter
    forms = [
      ['<s>', 'P', spaced, 'S', 'M', 'E', '</s>'],  # PSM, all prefix.
      ['<s>', 'P', 'S', letter, 'M', 'E', '</s>'],  # All suffix.
      ['<s>', 'P', 'S', 'M', letter, 'E', '</s>'],  # PSM, all middle.
      ['<s>', 'P', 'S', 'M', spaced, 'E', '</s>'],  # SPM, prefix + middle.
    ]
    fim_forms[letter] = {tuple(form) for form in forms}
    plain_forms[letter] = ('<s>', spaced, '</s>')
  return fim_forms, plain_forms


def test_loader_fims_only_documents_that_stay_in_one_row(tok, tmp_path):
  name = _name(tok)
  for letter in 'axy':
    (tmp_path / f'{letter}.py').write_text(letter)
  ds = loader.make_dataset(
    _files_config(tmp_path), tok, seq_len=10, batch_size=1, split='train', seed=0
  )
  fim_forms, plain_forms = _letter_rows(name)
  it = iter(ds)
  seen = collections.Counter()
  for _ in range(12):  # 24 documents: 8 passes over the 3 files.
    row = next(it)
    tokens = row['tokens'][0].tolist()
    pieces = [tok.id_to_piece(t) for t in tokens]
    head = [k for k, forms in fim_forms.items() if any(_ids(tok, f) == tokens[:7] for f in forms)]
    tail = [k for k, form in plain_forms.items() if _ids(tok, form) == tokens[7:]]
    assert len(head) == len(tail) == 1, pieces
    seen.update(head + tail)
    assert row['segment_ids'][0].tolist() == [1] * 7 + [2] * 3
    assert row['positions'][0].tolist() == [*range(7), *range(3)]
  assert seen == {'a': 8, 'x': 8, 'y': 8}


def _documents_by_row(rows, bos_id):
  """Each document of the packed rows as (ids, set of rows it touches)."""
  ids, row_of = [], []
  for r, row in enumerate(rows):
    real = row['segment_ids'][0] > 0
    ids.extend(row['tokens'][0][real].tolist())
    row_of.extend([r] * int(real.sum()))
  starts = [i for i, t in enumerate(ids) if t == bos_id] + [len(ids)]
  assert starts[0] == 0
  return [(ids[a:b], set(row_of[a:b])) for a, b in zip(starts, starts[1:], strict=False)]


def _mixed_corpus(root):
  """20 files of one function each, but every fourth of five (over 48 tokens)."""
  texts = {}
  for i in range(20):
    count = 5 if i % 4 == 0 else 1
    texts[f'f{i:02d}.py'] = ''.join(
      f'def {NAMES[(i + k) % 8]}_{k}(x, y):\n    return x * y + {i}\n' for k in range(count)
    )
  for rel, text in texts.items():
    (root / rel).write_text(text)
  return texts


def test_loader_never_cuts_a_fim_document(tok, tmp_path):
  texts = _mixed_corpus(tmp_path)
  seq_len = 48
  assert max(len(tok.encode(t)) for t in texts.values()) > seq_len  # Some must be cut.
  ds = loader.make_dataset(
    _files_config(tmp_path),
    tok,
    seq_len=seq_len,
    batch_size=1,
    split='train',
    seed=3,
    repeat=False,
  )
  docs = _documents_by_row(list(ds), tok.bos_id)
  assert len(docs) == len(texts)
  fimmed = cut = 0
  for ids, rows in docs:
    assert ids[-1] == tok.eos_id
    if tok.sentinels['prefix'] in ids:
      fimmed += 1
      assert len(rows) == 1, 'a FIM document was cut across rows'
    cut += len(rows) > 1
  assert fimmed >= 5 and cut >= 5
  got = collections.Counter(fim.restore(ids[1:-1], tok) for ids, _ in docs)
  assert got == collections.Counter(texts.values())


def test_loader_resumes_the_fim_choices(plain, tmp_path):
  _mixed_corpus(tmp_path)
  c_data = _files_config(tmp_path, streams=2, fim_rate=0.7)

  def make():
    return loader.make_dataset(c_data, plain, seq_len=24, batch_size=2, split='train', seed=1)

  it = iter(make())
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(8)]
  resumed = iter(make())
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_loader_without_fim_is_unchanged(plain, tmp_path):
  texts = _mixed_corpus(tmp_path)
  ds = loader.make_dataset(
    _files_config(tmp_path, fim_rate=0.0),
    plain,
    seq_len=48,
    batch_size=1,
    split='train',
    seed=3,
    repeat=False,
  )
  docs = _documents_by_row(list(ds), plain.bos_id)
  want = {(plain.bos_id, *plain.encode(t), plain.eos_id) for t in texts.values()}
  assert {tuple(ids) for ids, _ in docs} == want


def test_loader_state_without_the_row_offset_is_refused(plain, tmp_path):
  _mixed_corpus(tmp_path)

  def make(fim_rate):
    c_data = _files_config(tmp_path, fim_rate=fim_rate)
    return loader.make_dataset(c_data, plain, seq_len=24, batch_size=1, split='train', seed=1)

  it = iter(make(0.0))
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = iter(make(0.5))
  with pytest.raises(ValueError, match=r'no row offset for data\.fim_rate > 0'):
    resumed.set_state(state)
