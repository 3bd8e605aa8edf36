"""Instruction dialogs in the CodeLlama-Instruct (LLaMA-2 chat) format.

The template is Meta's `Llama.chat_completion` (meta-llama/codellama
llama/generation.py at e81b597, lines 59-60 and 323-360): the system message is
merged into the first user message, and each turn is encoded on its own:

  complete pair:    [BOS] enc(f'{B_INST} {user.strip()} {E_INST} {answer.strip()} ') [EOS]
  final user turn:  [BOS] enc(f'{B_INST} {user.strip()} {E_INST}')

Hugging Face's chat_template tokenizes the dialog whole; we follow Meta. Text
cannot forge a turn: BOS and EOS are control pieces that encode() never emits.
The loss mask covers every token holding a character of f' {answer} ' (a token
straddling the boundary counts: the model must produce it), plus the EOS; the
trailing space is kept because the reference puts it before every EOS.
"""

import collections
import dataclasses
import gzip
import json
import os
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np
from sentencepiece import sentencepiece_pb2

from clm_jax.data import sources
from clm_jax.data import tokenizer as tokenizer_lib

B_INST, E_INST = '[INST]', '[/INST]'
B_SYS, E_SYS = '<<SYS>>\n', '\n<</SYS>>\n\n'
ROLES = ('system', 'user', 'assistant')
# Why a record was skipped. 'unreadable': the rest of a truncated or corrupt
# file, counted once, as data.sources does.
REASONS = (
  'bad_json',
  'missing_field',
  'bad_role',
  'bad_order',
  'empty',
  'not_text',
  'no_answer',
  'unreadable',
)


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A tokenized training dialog: int32 [T] tokens, and 1 on the answers and their EOS."""

  tokens: np.ndarray
  loss_mask: np.ndarray


class BadRecord(ValueError):
  """An unusable dialog or record: `reason` (of REASONS), `detail`, `source` ('file:line' or '')."""

  def __init__(self, reason: str, detail: str, source: str = ''):
    super().__init__(reason, detail, source)
    self.reason = reason
    self.detail = detail
    self.source = source

  def __str__(self) -> str:
    where = f'{self.source}: ' if self.source else ''
    return f'{where}{self.detail} ({self.reason})'


def render(messages: Sequence[dict], tokenizer: tokenizer_lib.Tokenizer) -> Rendered:
  """Tokenizes a training dialog with its loss mask (see the module docstring).

  `messages` ends with an assistant answer; the tokens equal Meta's prompt for
  the same dialog plus that answer and its EOS. Raises BadRecord (`reason` says
  why) if the dialog breaks the format.
  """
  tokens, mask = [], []
  for user, answer in _turns(messages, final='assistant'):
    prompt = _instruction(user)
    ids, answer_mask = _encode_marked(tokenizer, f'{prompt} {answer.strip()} ', len(prompt))
    tokens += [tokenizer.bos_id, *ids, tokenizer.eos_id]
    mask += [0, *answer_mask, 1]
  return Rendered(np.asarray(tokens, np.int32), np.asarray(mask, np.int32))


def prompt_tokens(messages: Sequence[dict], tokenizer: tokenizer_lib.Tokenizer) -> list[int]:
  """The ids that prompt for the next answer, as Meta's chat_completion.

  Raises BadRecord if the dialog breaks the format or does not end with a user turn.
  """
  tokens = []
  for user, answer in _turns(messages, final='user'):
    text = _instruction(user)
    if answer is None:
      tokens += [tokenizer.bos_id, *tokenizer.encode(text)]
    else:
      tokens += [tokenizer.bos_id, *tokenizer.encode(f'{text} {answer.strip()} '), tokenizer.eos_id]
  return tokens


def from_record(record) -> list[dict]:
  """The checked training dialog of one JSONL record.

  Args:
    record: {'prompt', 'completion'} with an optional 'system' (None or '' mean
      none), or {'messages': [{'role', 'content'}, ...]}, which wins where both
      are present; other keys are ignored.

  Raises:
    BadRecord: Not a usable training dialog; `reason` is one of REASONS.
  """
  if not isinstance(record, dict):
    raise BadRecord('bad_json', f'a record must be a JSON object, not {type(record).__name__}')
  if 'messages' in record:
    messages = record['messages']
    if not isinstance(messages, list):
      raise BadRecord('bad_json', "'messages' must be a list of {role, content} objects")
  elif 'prompt' in record:
    if record.get('completion') is None:
      raise BadRecord('no_answer', "a 'prompt' record needs a 'completion'")
    messages = [
      {'role': 'user', 'content': record['prompt']},
      {'role': 'assistant', 'content': record['completion']},
    ]
    if record.get('system') not in (None, ''):
      messages.insert(0, {'role': 'system', 'content': record['system']})
  else:
    raise BadRecord('missing_field', "a record needs 'messages', or 'prompt' and 'completion'")
  _turns(messages, final='assistant')
  return [{'role': m['role'], 'content': m['content']} for m in messages]


def read_jsonl(
  paths: str | os.PathLike | Iterable[str | os.PathLike], *, strict: bool = False
) -> Iterator[list[dict] | sources.Skipped]:
  """Streams the dialogs of JSONL (or .jsonl.gz) files, in order.

  Blank lines are ignored; an unusable line yields a `sources.Skipped` with
  source 'path:line', or with `strict` raises BadRecord naming file and line.
  """
  if isinstance(paths, str | os.PathLike):
    paths = [paths]
  for path in map(os.fspath, paths):
    for item in _read_file(path):
      if strict and isinstance(item, BadRecord):
        raise item
      yield sources.Skipped(item.reason, item.source) if isinstance(item, BadRecord) else item


def records_to_examples(
  paths: str | os.PathLike | Iterable[str | os.PathLike],
  tokenizer: tokenizer_lib.Tokenizer,
) -> tuple[list[Rendered], collections.Counter]:
  """Renders every dialog of small JSONL files; returns them and skip counts by reason."""
  examples, skipped = [], collections.Counter()
  for item in read_jsonl(paths):
    if isinstance(item, sources.Skipped):
      skipped[item.reason] += 1
    else:
      examples.append(render(item, tokenizer))
  return examples, skipped


def _read_file(path: str) -> Iterator[list[dict] | BadRecord]:
  opener = gzip.open if path.lower().endswith('.gz') else open
  line_number = 0
  try:
    with opener(path, 'rb') as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        source = f'{path}:{line_number}'
        try:
          record = json.loads(line)
        except ValueError:  # UnicodeDecodeError too: a line that is not UTF-8.
          yield BadRecord('bad_json', 'not a JSON line', source)
          continue
        try:
          yield from_record(record)
        except BadRecord as e:
          yield BadRecord(e.reason, e.detail, source)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    # A truncated or corrupt file: what was read stays, the rest is one skip.
    yield BadRecord('unreadable', f'unreadable from here on: {e}', f'{path}:{line_number + 1}')


def _turns(messages: Sequence[dict], *, final: str) -> list[tuple[str, str | None]]:
  """Checks a dialog and pairs it into (user, answer) turns, as Meta does.

  The system message is merged into the first user content; the last answer is
  None when `final` is 'user'.
  """
  if not messages:
    raise BadRecord('empty', 'the dialog has no messages')
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise BadRecord('bad_json', f'message {i} is a {type(message).__name__}, not an object')
    if 'role' not in message or 'content' not in message:
      raise BadRecord('missing_field', f"message {i} needs 'role' and 'content'")
    if message['role'] not in ROLES:
      raise BadRecord('bad_role', f'message {i} has role {message["role"]!r}, not one of {ROLES}')
    if not isinstance(message['content'], str):
      raise BadRecord('not_text', f'message {i} content is {type(message["content"]).__name__}')
    if not message['content'].strip():
      raise BadRecord('empty', f'message {i} ({message["role"]}) is blank')
  contents = [m['content'] for m in messages]
  roles = [m['role'] for m in messages]
  if roles[0] == 'system':
    if roles[1:2] != ['user']:
      raise BadRecord('bad_order', 'a system message must be followed by a user message')
    contents = [B_SYS + contents[0] + E_SYS + contents[1], *contents[2:]]
    roles = roles[1:]
  if any(role != ('user', 'assistant')[i % 2] for i, role in enumerate(roles)):
    raise BadRecord(
      'bad_order', f'roles {roles} must be [system,] user, assistant, user, ... alternating'
    )
  if roles[-1] != final:
    if final == 'assistant':
      raise BadRecord('no_answer', 'a training dialog must end with an assistant answer')
    raise BadRecord('bad_order', 'a prompt must end with the user message to answer')
  users, answers = contents[::2], contents[1::2]
  return list(zip(users, answers + [None] * (len(users) - len(answers)), strict=True))


def _instruction(user: str) -> str:
  return f'{B_INST} {user.strip()} {E_INST}'


def _encode_marked(
  tokenizer: tokenizer_lib.Tokenizer, text: str, boundary: int
) -> tuple[list[int], list[int]]:
  """Encodes `text` at once; marks each token holding a character at or after `boundary`."""
  ids = tokenizer.encode(text)
  ends = _byte_ends(tokenizer, text, ids)
  if ends is not None:
    cut = len(text[:boundary].encode())
    return ids, [int(end > cut) for end in ends]
  return ids, _marks_by_decoding(tokenizer, ids, boundary)


def _byte_ends(tokenizer, text: str, ids: list[int]) -> list[int] | None:
  """Each token's end byte offset in `text`, None where sentencepiece cannot say.

  None also when the ids differ from one proto call's: our Tokenizer encodes
  text holding a literal U+2581 in parts.
  """
  processor = getattr(tokenizer, '_sp', None)
  if processor is None:
    return None
  proto = sentencepiece_pb2.SentencePieceText.FromString(
    processor.encode(text, out_type='serialized_proto')
  )
  if [piece.id for piece in proto.pieces] != ids:
    return None
  return [piece.end for piece in proto.pieces]


def _marks_by_decoding(tokenizer, ids: list[int], boundary: int) -> list[int]:
  """Marks tokens past `boundary` characters using only decode(), by bisection.

  Decoded prefixes may end in U+FFFD for a character cut inside its bytes; the
  prompt ends in ASCII ' [/INST]', so such cuts stay below `boundary`.
  """
  low, high = 0, len(ids)  # The first answer token lies in [low, high].
  while low < high:
    middle = (low + high) // 2
    if len(tokenizer.decode(ids[: middle + 1])) > boundary:
      high = middle
    else:
      low = middle + 1
  return [0] * low + [1] * (len(ids) - low)
