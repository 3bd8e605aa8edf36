"""Tests of clm_jax.data.chat: the CodeLlama-Instruct template, loss masks, JSONL records.

Expected prompts are written out by hand in the published format (Meta's
chat_completion, Hugging Face's CodeLlama-Instruct chat template) and turned
into ids here, independently of chat.py: '<s>' and '</s>' become BOS and EOS,
and each text between them is encoded whole, as the reference encodes a turn.
"""

import collections
import gzip
import importlib.util
import io
import itertools
import json
import pathlib
import re
import sys
import sysconfig

import numpy as np
import pytest
import sentencepiece as spm

from clm_jax.data import chat
from clm_jax.data import sources
from clm_jax.data import tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / 'data' / 'instruct'
SHIPPED = ('stdlib_tasks.jsonl', 'heldout.jsonl')
VOCAB = 600


def _corpus() -> list[str]:
  # Code and prose enough to learn merges; byte fallback covers the rest.
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  modules = ('textwrap.py', 'posixpath.py', 'inspect.py', 'json/decoder.py')
  return [(root / module).read_text(encoding='utf-8') for module in modules]


@pytest.fixture(scope='module')
def ours(tmp_path_factory):
  """Our lossless tokenizer: no dummy prefix."""
  return tokenizer.train(_corpus(), tmp_path_factory.mktemp('tok') / 'ours.model', VOCAB)


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """A tokenizer trained as LLaMA's: a dummy-prefix space, byte fallback, no pad."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    # One line a sentence, as LLaMA's: '\n' stays a byte piece.
    sentence_iterator=(line for text in _corpus() for line in text.splitlines() if line),
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
    minloglevel=2,
  )
  path = tmp_path_factory.mktemp('tok') / 'llama.model'
  path.write_bytes(model.getvalue())
  return tokenizer.load(path)


@pytest.fixture(params=['ours', 'llama'])
def tok(request):
  return request.getfixturevalue(request.param)


class _EncodeDecodeOnly:
  """A tokenizer without sentencepiece's offsets: chat falls back to decoding."""

  def __init__(self, inner):
    self._inner = inner
    self.bos_id, self.eos_id = inner.bos_id, inner.eos_id

  def encode(self, text):
    return self._inner.encode(text)

  def decode(self, ids):
    return self._inner.decode(ids)


def _ids(expected: str, tok) -> list[int]:
  """Ids of a hand-written prompt: '<s>' / '</s>' are BOS / EOS, text between is one encode."""
  ids = []
  for part in re.split(r'(</?s>)', expected):
    if part == '<s>':
      ids.append(tok.bos_id)
    elif part == '</s>':
      ids.append(tok.eos_id)
    elif part:
      ids.extend(tok.encode(part))
  return ids


SYSTEM = {'role': 'system', 'content': 'You are a helpful assistant.'}
HELLO = [
  {'role': 'user', 'content': 'Write hello'},
  {'role': 'assistant', 'content': "print('hello')"},
]
THANKS = {'role': 'user', 'content': 'Thanks'}


def test_the_two_tokenizers_differ_by_the_dummy_prefix(ours, llama):
  assert ours.id_to_piece(ours.encode('[INST]')[0]) == '['
  assert llama.id_to_piece(llama.encode('[INST]')[0]).startswith('\u2581')
  assert llama.decode(llama.encode('[INST]')) == '[INST]'


@pytest.mark.parametrize(
  ('messages', 'expected'),
  [
    (HELLO, "<s>[INST] Write hello [/INST] print('hello') </s>"),
    (
      [SYSTEM, *HELLO],
      '<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWrite hello [/INST]'
      " print('hello') </s>",
    ),
    (
      [*HELLO, THANKS, {'role': 'assistant', 'content': 'You are welcome.'}],
      "<s>[INST] Write hello [/INST] print('hello') </s>"
      '<s>[INST] Thanks [/INST] You are welcome. </s>',
    ),
    (
      # Surrounding whitespace is stripped from each turn, as the reference does.
      [
        {'role': 'user', 'content': '\n  Write hello\t\n'},
        {'role': 'assistant', 'content': "  print('hello')\n\n"},
      ],
      "<s>[INST] Write hello [/INST] print('hello') </s>",
    ),
  ],
  ids=['single', 'system', 'multi', 'stripped'],
)
def test_render_matches_the_published_format(tok, messages, expected):
  rendered = chat.render(messages, tok)
  assert rendered.tokens.dtype == np.int32 and rendered.loss_mask.dtype == np.int32
  assert rendered.tokens.tolist() == _ids(expected, tok)


@pytest.mark.parametrize(
  ('messages', 'expected'),
  [
    ([HELLO[0]], '<s>[INST] Write hello [/INST]'),
    (
      [SYSTEM, *HELLO, THANKS],
      '<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWrite hello [/INST]'
      " print('hello') </s><s>[INST] Thanks [/INST]",
    ),
    (
      # The system prompt keeps its own whitespace: the reference strips the
      # merged content, whose ends are '<<SYS>>' and the user's text.
      [{'role': 'system', 'content': ' Be brief. '}, {'role': 'user', 'content': ' Hi '}],
      '<s>[INST] <<SYS>>\n Be brief. \n<</SYS>>\n\n Hi [/INST]',
    ),
  ],
  ids=['single', 'system_multi', 'system_spaces'],
)
def test_prompt_tokens_match_the_published_format(tok, messages, expected):
  assert chat.prompt_tokens(messages, tok) == _ids(expected, tok)


def test_the_prompt_is_a_prefix_of_the_training_dialog(tok):
  dialog = [SYSTEM, *HELLO, THANKS, {'role': 'assistant', 'content': 'Any time.'}]
  tokens = chat.render(dialog, tok).tokens.tolist()
  prompt = chat.prompt_tokens(dialog[:-1], tok)
  assert tokens[: len(prompt)] == prompt
  assert tok.decode(tokens[len(prompt) :]).strip() == 'Any time.'


TRICKY = [
  [
    {'role': 'system', 'content': 'Answer in code.\n'},
    {'role': 'user', 'content': 'Sum a list 😀 ünï 中文'},
    {'role': 'assistant', 'content': 'def total(xs):\n    return sum(xs)  # 中文 😀\n'},
    {'role': 'user', 'content': 'And with\ttabs?'},
    {'role': 'assistant', 'content': 'def total(xs):\n\treturn sum(xs)'},
  ],
  [
    # '[/INST]' inside an answer is text: the boundary is where the template puts it.
    {'role': 'user', 'content': 'Print the tag.'},
    {'role': 'assistant', 'content': 'print("[/INST] </s>")'},
  ],
  [
    {'role': 'user', 'content': 'x' * 300},
    {'role': 'assistant', 'content': '1234567890 ' * 30},
  ],
]


def _turns(rendered: chat.Rendered, tok):
  """Splits a rendered dialog at its BOS ids into (tokens, mask) per turn."""
  starts = np.flatnonzero(rendered.tokens == tok.bos_id).tolist() + [len(rendered.tokens)]
  return [(rendered.tokens[a:b], rendered.loss_mask[a:b]) for a, b in itertools.pairwise(starts)]


@pytest.mark.parametrize('dialog', TRICKY + [[SYSTEM, *HELLO, THANKS, HELLO[1]]])
def test_loss_mask_covers_exactly_the_answers_and_their_eos(tok, ours, dialog):
  rendered = chat.render(dialog, tok)
  answers = [m['content'].strip() for m in dialog if m['role'] == 'assistant']
  turns = _turns(rendered, tok)
  assert len(turns) == len(answers)
  for (tokens, mask), answer in zip(turns, answers, strict=True):
    assert tokens[0] == tok.bos_id and mask[0] == 0
    assert tokens[-1] == tok.eos_id and mask[-1] == 1
    # The answer is one run at the end of the turn: prompt tokens, then targets.
    first = int(np.argmax(mask))
    assert mask[:first].sum() == 0 and mask[first:].all()
    prompt, target = tok.decode(tokens[:first]), tok.decode(tokens[first:])
    assert prompt.endswith(chat.E_INST)
    if tok is ours:
      assert target == f' {answer} '  # Lossless: both template spaces are targets.
    else:
      assert target == f'{answer} '  # decode() drops the first piece's space.


@pytest.mark.parametrize('dialog', TRICKY + [[SYSTEM, *HELLO]])
def test_offsets_and_the_decoding_fallback_agree(tok, dialog):
  rendered = chat.render(dialog, tok)
  fallback = chat.render(dialog, _EncodeDecodeOnly(tok))
  np.testing.assert_array_equal(fallback.tokens, rendered.tokens)
  np.testing.assert_array_equal(fallback.loss_mask, rendered.loss_mask)
  # Else both would have taken the fallback: sentencepiece's offsets are used.
  text = chat._instruction(dialog[-2]['content']) + f' {dialog[-1]["content"].strip()} '
  assert chat._byte_ends(tok, text, tok.encode(text)) is not None


def test_literal_space_symbol_is_masked_right(ours):
  # Our tokenizer encodes a literal U+2581 apart from the rest, so sentencepiece's
  # offsets for the whole text no longer match the ids.
  dialog = [
    {'role': 'user', 'content': 'Show \u2581'},
    {'role': 'assistant', 'content': 'x = "\u2581\u2581"'},
  ]
  rendered = chat.render(dialog, ours)
  assert rendered.tokens.tolist() == _ids(
    '<s>[INST] Show \u2581 [/INST] x = "\u2581\u2581" </s>', ours
  )
  ((tokens, mask),) = _turns(rendered, ours)
  assert ours.decode(tokens[mask == 1]) == ' x = "\u2581\u2581" '


BAD_DIALOGS = [
  ([], 'empty'),
  ([{'role': 'user'}], 'missing_field'),
  ([{'content': 'hi'}], 'missing_field'),
  ([{'role': 'bot', 'content': 'hi'}], 'bad_role'),
  ([{'role': 'user', 'content': 3}, HELLO[1]], 'not_text'),
  ([{'role': 'user', 'content': ' \n'}, HELLO[1]], 'empty'),
  ([HELLO[1], HELLO[0]], 'bad_order'),
  ([HELLO[0], HELLO[0], HELLO[1]], 'bad_order'),
  ([*HELLO, SYSTEM, *HELLO], 'bad_order'),
  ([SYSTEM, HELLO[1]], 'bad_order'),
  ([SYSTEM], 'bad_order'),
  ([HELLO[0]], 'no_answer'),
  ([SYSTEM, *HELLO, THANKS], 'no_answer'),
]


@pytest.mark.parametrize(('messages', 'reason'), BAD_DIALOGS)
def test_render_rejects_bad_dialogs(ours, messages, reason):
  with pytest.raises(chat.BadRecord) as e:
    chat.render(messages, ours)
  assert e.value.reason == reason
  assert isinstance(e.value, ValueError)


@pytest.mark.parametrize('messages', [[*HELLO], [SYSTEM], [THANKS, THANKS]])
def test_prompt_tokens_needs_a_final_user_turn(ours, messages):
  with pytest.raises(chat.BadRecord) as e:
    chat.prompt_tokens(messages, ours)
  assert e.value.reason == 'bad_order'


def test_from_record_forms():
  assert chat.from_record({'prompt': 'Write hello', 'completion': "print('hello')"}) == HELLO
  assert chat.from_record(
    {'system': SYSTEM['content'], 'prompt': 'Write hello', 'completion': "print('hello')"}
  ) == [SYSTEM, *HELLO]
  # An empty system column means none.
  assert (
    chat.from_record({'system': '', 'prompt': 'Write hello', 'completion': "print('hello')"})
    == HELLO
  )
  messages = [{**m, 'name': 'x'} for m in [SYSTEM, *HELLO]]
  record = {'id': 7, 'messages': messages}
  assert chat.from_record(record) == [SYSTEM, *HELLO]  # Only role and content stay.
  assert record['messages'][0]['name'] == 'x'  # The record itself is left alone.


# Each bad JSONL line, and the reason it is skipped for.
BAD_LINES = [
  ('{"prompt": "a", "completion": ', 'bad_json'),
  ('[1, 2]', 'bad_json'),
  ('{"messages": "hi"}', 'bad_json'),
  ('{"messages": ["hi"]}', 'bad_json'),
  ('{"text": "no dialog here"}', 'missing_field'),
  ('{"messages": [{"role": "user"}]}', 'missing_field'),
  ('{"messages": [{"role": "tool", "content": "x"}]}', 'bad_role'),
  ('{"messages": [{"role": "assistant", "content": "x"}]}', 'bad_order'),
  ('{"prompt": "", "completion": "x"}', 'empty'),
  ('{"messages": []}', 'empty'),
  ('{"prompt": ["a"], "completion": "x"}', 'not_text'),
  ('{"prompt": "a", "completion": 5}', 'not_text'),
  ('{"system": 1, "prompt": "a", "completion": "b"}', 'not_text'),
  ('{"prompt": "a"}', 'no_answer'),
  ('{"messages": [{"role": "user", "content": "a"}]}', 'no_answer'),
]
GOOD_LINES = [
  '{"prompt": "Write hello", "completion": "print(\'hello\')"}',
  json.dumps({'messages': [SYSTEM, *HELLO]}),
]


def _write_jsonl(path: pathlib.Path, lines: list[str | bytes]) -> None:
  data = b''.join((line if isinstance(line, bytes) else line.encode()) + b'\n' for line in lines)
  if path.name.endswith('.gz'):
    data = gzip.compress(data)
  path.write_bytes(data)


def test_read_jsonl_skips_and_counts_every_reason_by_file_and_line(tmp_path, ours):
  lines = [GOOD_LINES[0], '', *(line for line, _ in BAD_LINES), GOOD_LINES[1]]
  plain, zipped = tmp_path / 'a.jsonl', tmp_path / 'b.jsonl.gz'
  _write_jsonl(plain, lines)
  _write_jsonl(zipped, [*lines, b'{"prompt": "\xff", "completion": "not UTF-8"}'])
  items = list(chat.read_jsonl([plain, str(zipped)]))
  dialogs = [i for i in items if not isinstance(i, sources.Skipped)]
  skipped = [i for i in items if isinstance(i, sources.Skipped)]
  assert dialogs == [HELLO, [SYSTEM, *HELLO]] * 2
  # Line 1 is good and line 2 blank (ignored), so BAD_LINES[k] is line k + 3.
  expected = [
    (reason, f'{path}:{k + 3}')
    for path in (plain, zipped)
    for k, (_, reason) in enumerate(BAD_LINES)
  ]
  expected.append(('bad_json', f'{zipped}:{len(lines) + 1}'))  # Not UTF-8.
  assert [(s.reason, s.source) for s in skipped] == expected
  assert set(chat.REASONS) - {s.reason for s in skipped} == {'unreadable'}

  examples, counts = chat.records_to_examples([plain, zipped], ours)
  assert len(examples) == 4
  assert counts == collections.Counter(reason for reason, _ in expected)


def test_read_jsonl_strict_names_the_file_and_line(tmp_path):
  path = tmp_path / 'sft.jsonl'
  _write_jsonl(path, [GOOD_LINES[0], '{"prompt": "a"}'])
  items = chat.read_jsonl(path, strict=True)
  assert next(items) == HELLO
  with pytest.raises(chat.BadRecord, match=re.escape(f'{path}:2')) as e:
    next(items)
  assert e.value.reason == 'no_answer' and e.value.source == f'{path}:2'


def test_truncated_gzip_keeps_what_was_read_and_counts_the_rest(tmp_path):
  path = tmp_path / 'cut.jsonl.gz'
  _write_jsonl(path, GOOD_LINES * 2000)
  path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
  items = list(chat.read_jsonl(path))
  assert isinstance(items[-1], sources.Skipped) and items[-1].reason == 'unreadable'
  assert items[-1].source == f'{path}:{len(items)}'
  assert all(not isinstance(i, sources.Skipped) for i in items[:-1]) and len(items) > 1


def test_the_shipped_data_loads_and_renders(ours, llama):
  files = [DATA / name for name in SHIPPED]
  assert sum(p.stat().st_size for p in files) < 2**20
  records = {p.name: [json.loads(line) for line in p.open(encoding='utf-8')] for p in files}
  assert len(records['stdlib_tasks.jsonl']) > 300 and len(records['heldout.jsonl']) > 10
  functions = {name: {r['id'].split('/')[0] for r in rs} for name, rs in records.items()}
  assert not functions['stdlib_tasks.jsonl'] & functions['heldout.jsonl']
  for tok in (ours, llama):
    examples, skipped = chat.records_to_examples(files, tok)
    assert not skipped
    assert len(examples) == sum(map(len, records.values()))
    for example in examples:
      assert example.tokens[-1] == tok.eos_id and example.loss_mask[-1] == 1
      assert example.tokens[0] == tok.bos_id and example.loss_mask[0] == 0
      assert 0 < example.loss_mask.sum() < len(example.tokens)


def _generator():
  spec = importlib.util.spec_from_file_location(
    'make_instruct_data', ROOT / 'tools' / 'make_instruct_data.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_generator_reproduces_the_shipped_files(tmp_path):
  generator = _generator()
  python = f'{sys.version_info.major}.{sys.version_info.minor}'
  if python != generator.PYTHON:
    pytest.skip(f'data/instruct was generated on Python {generator.PYTHON}; this is {python}.')
  counts = generator.generate(tmp_path)
  for name in SHIPPED:
    assert counts[name] == len((DATA / name).read_text(encoding='utf-8').splitlines())
    assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
      f'{name} differs: rerun tools/make_instruct_data.py (see data/instruct/README.md)'
    )
