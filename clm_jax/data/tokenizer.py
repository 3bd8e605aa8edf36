"""SentencePiece BPE tokenizer for code: train, cache, load, special ids.

Trained models are lossless (`decode(encode(text)) == text` for any str) and
fix the ids 0 <unk> 1 <s> 2 </s> 3 <pad> 4 <PRE> 5 <SUF> 6 <MID> 7 <EOT>, then
256 byte pieces, then learned ones. The sentinels are control symbols, so the
literal text '<PRE>' encodes as ordinary pieces: data can never forge one.
"""

import hashlib
import heapq
import io
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence

import ml_collections
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from clm_jax.data import sources

# The sentencepiece model's file name beside a run, a params-only checkpoint, a
# Hugging Face directory and prepared data.
TOKENIZER_FILE = 'tokenizer.model'

# Infilling sentinels by role, as `sentinels` names them, and their pieces.
SENTINEL_PIECES = {
  'prefix': '<PRE>',
  'suffix': '<SUF>',
  'middle': '<MID>',
  'eot': '<EOT>',
}
PAD_PIECE = '<pad>'

# sentencepiece writes ' ' as U+2581 and decodes every U+2581 back to ' ', so a
# literal U+2581 in text must travel as its UTF-8 bytes to round-trip.
_SPACE_SYMBOL = '\u2581'

# Bump when the training recipe changes so cached models made the old way are
# not picked up by for_corpus.
_RECIPE_VERSION = 1

_TRAINER_OPTIONS = dict(
  model_type='bpe',
  byte_fallback=True,  # Unseen characters become byte pieces, never <unk>.
  split_digits=True,  # '12345' -> 5 pieces: numbers generalise digit by digit.
  normalization_rule_name='identity',  # NFKC would rewrite code (e.g. 'ﬁ').
  remove_extra_whitespaces=False,
  add_dummy_prefix=False,  # A leading ' ' would break byte-exact round trips.
  allow_whitespace_only_pieces=True,  # Indentation runs become single pieces.
  split_by_whitespace=True,  # Keeps indentation apart from the next word.
  unk_id=0,
  bos_id=1,
  eos_id=2,
  pad_id=3,
  pad_piece=PAD_PIECE,
  control_symbols=list(SENTINEL_PIECES.values()),
  character_coverage=0.9995,  # Rarer characters fall back to bytes.
  minloglevel=1,  # Warnings only; train() prints its own progress.
)


class Tokenizer:
  """A loaded sentencepiece model with the ids the trainer and data need.

  `sentinels` maps 'prefix', 'suffix', 'middle', 'eot' to ids, None where the
  model has no such piece (e.g. a LLaMA-2 tokenizer).
  """

  def __init__(self, processor: spm.SentencePieceProcessor, path: str):
    self._sp = processor
    self.path = path
    self.sentinels = {role: self._find_piece(piece) for role, piece in SENTINEL_PIECES.items()}
    proto = sentencepiece_model_pb2.ModelProto.FromString(processor.serialized_model_proto())
    self._space_symbol_ids = _space_symbol_ids(processor, proto.normalizer_spec)
    # Infilling parts are pieces of a text, so they must not get the dummy ' '
    # that LLaMA-style models put before every encoded text. CodeLlama drops
    # it by encoding '☺' + part and cutting the '☺' pieces off; a copy of the
    # model with the dummy prefix turned off gives those ids without assuming
    # how '☺' tokenizes, and decodes without stripping a leading ' '.
    self._fragment_sp = processor
    if proto.normalizer_spec.add_dummy_prefix:
      proto.normalizer_spec.add_dummy_prefix = False
      self._fragment_sp = spm.SentencePieceProcessor()
      self._fragment_sp.LoadFromSerializedProto(proto.SerializeToString())
    self._fragment_space_symbol_ids = _space_symbol_ids(self._fragment_sp, proto.normalizer_spec)

  def __repr__(self) -> str:
    return f'Tokenizer({self.path!r}, vocab_size={self.vocab_size})'

  # Grain's worker processes receive the pipeline pickled; the processor
  # itself does not pickle, so the model travels as its serialized proto.
  def __reduce__(self):
    return from_bytes, (self._sp.serialized_model_proto(), self.path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """The pad id; unk's for models without one (LLaMA's has pad_id -1)."""
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self.unk_id

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`, without BOS or EOS."""
    return _encode(self._sp, self._space_symbol_ids, text)

  def encode_fragment(self, text: str) -> list[int]:
    """Returns the ids of `text` as a piece of a longer text: no dummy prefix.

    As CodeLlama's `encode_infilling`: with LLaMA's tokenizer `encode(' + 1')`
    starts with a spurious '▁' piece, this does not. Same as `encode` for
    models without a dummy prefix, such as the ones `train` makes.
    """
    return _encode(self._fragment_sp, self._fragment_space_symbol_ids, text)

  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids`; control ids (BOS, EOS, PAD, sentinels) vanish."""
    # int() accepts NumPy and JAX scalars, which sentencepiece rejects.
    return self._sp.decode([int(i) for i in ids])

  def decode_fragment(self, ids: Iterable[int]) -> str:
    """The inverse of `encode_fragment`: a leading ' ' is text, not a dummy prefix."""
    return self._fragment_sp.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def _find_piece(self, piece: str) -> int | None:
    # CodeLlama stores its sentinels with the space prefix ('▁<PRE>').
    for candidate in (piece, _SPACE_SYMBOL + piece):
      token_id = self._sp.piece_to_id(candidate)
      if self._sp.id_to_piece(token_id) == candidate:
        return token_id
    return None


def _space_symbol_ids(
  processor: spm.SentencePieceProcessor, normalizer: sentencepiece_model_pb2.NormalizerSpec
) -> list[int] | None:
  """The byte ids of U+2581 where `_encode` may split text around it, else None."""
  # Splitting text around U+2581 is only exact for models that do not add a
  # dummy ' ' to each encoded part.
  if normalizer.add_dummy_prefix or normalizer.remove_extra_whitespaces:
    return None
  space_bytes = [processor.piece_to_id(f'<0x{b:02X}>') for b in _SPACE_SYMBOL.encode()]
  return space_bytes if all(processor.is_byte(i) for i in space_bytes) else None


def _encode(
  processor: spm.SentencePieceProcessor, space_symbol_ids: list[int] | None, text: str
) -> list[int]:
  if space_symbol_ids is None or _SPACE_SYMBOL not in text:
    return processor.encode(text)
  ids = []
  for i, part in enumerate(text.split(_SPACE_SYMBOL)):
    if i:
      ids.extend(space_symbol_ids)
    if part:
      ids.extend(processor.encode(part))
  return ids


def from_bytes(proto: bytes, path: str) -> Tokenizer:
  """A Tokenizer of a sentencepiece model's bytes (from a checkpoint); `path` names it."""
  processor = spm.SentencePieceProcessor()
  processor.LoadFromSerializedProto(proto)
  return Tokenizer(processor, path)


def load(path: str | os.PathLike) -> Tokenizer:
  """Loads any sentencepiece model, e.g. ours or CodeLlama's tokenizer.model."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'No sentencepiece tokenizer model at {path}.')
  processor = spm.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(path.read_bytes())
  except RuntimeError as e:
    raise ValueError(f'{path} is not a valid sentencepiece model: {e}') from e
  return Tokenizer(processor, str(path))


def train(
  texts: Iterable[str],
  model_path: str | os.PathLike,
  vocab_size: int,
  *,
  max_sentence_length: int = 8192,
  verbose: bool = False,
) -> Tokenizer:
  """Trains a lossless BPE tokenizer for code and writes it atomically.

  Args:
    texts: Documents, cut at line boundaries (newlines kept) into sentences
      of at most `max_sentence_length` bytes: sentencepiece silently skips
      longer ones.
    vocab_size: Pieces in the model, the 8 special ones and 256 bytes included.
  """
  model_path = pathlib.Path(model_path).expanduser()
  model_path.parent.mkdir(parents=True, exist_ok=True)
  print(f'Training a {vocab_size}-piece BPE tokenizer -> {model_path}', flush=True)
  counts = {'texts': 0, 'bytes': 0}
  model = io.BytesIO()
  start = time.perf_counter()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=_sentences(texts, max_sentence_length, counts),
      model_writer=model,
      vocab_size=vocab_size,
      max_sentence_length=max_sentence_length,
      num_threads=os.cpu_count() or 1,
      **{**_TRAINER_OPTIONS, 'minloglevel': 0 if verbose else 1},
    )
  except RuntimeError as e:
    # Typically too small a vocabulary for the characters seen, or too little
    # text to learn vocab_size pieces from.
    raise ValueError(
      f'Could not train a {vocab_size}-piece tokenizer on {counts["texts"]} '
      f'texts ({counts["bytes"] / 2**20:.2f} MiB): {e}'
    ) from e
  _write_atomically(model_path, model.getvalue())
  print(
    f'Trained the tokenizer on {counts["texts"]} texts, '
    f'{counts["bytes"] / 2**20:.1f} MiB, in {time.perf_counter() - start:.1f}s.',
    flush=True,
  )
  return load(model_path)


def train_on_inputs(
  inputs: Sequence[str],
  model_path: str | os.PathLike,
  vocab_size: int,
  *,
  sample_mb: float,
  read_options: sources.ReadOptions | None = None,
  languages: Sequence[str] = (),
  verbose: bool = True,
) -> Tokenizer:
  """Trains on a uniform sample of at most `sample_mb` MiB of any inputs.

  `inputs` (see sources.list_units) are streamed once and only the sample is
  held, so the corpus may be far larger than RAM; unusable documents are
  skipped as `data prepare` skips them. `languages=()` keeps all.
  """
  units = sources.list_units(inputs)
  read_options = read_options or sources.ReadOptions()
  documents = skipped = read = 0

  def texts():
    nonlocal documents, skipped, read
    for unit in units:
      for item in sources.read_unit(unit, read_options):
        if isinstance(item, sources.Skipped) or (languages and item.language not in languages):
          skipped += 1
          continue
        documents += 1
        read += len(item.text)
        if verbose and documents % 10_000 == 0:
          print(f'  read {documents:,} documents, {read / 2**20:,.0f} MB', flush=True)
        yield item.text

  sample = sample_texts(texts(), int(sample_mb * 2**20))
  if verbose:
    print(
      f'Sampled {len(sample):,} of {documents:,} documents ({skipped:,} skipped) '
      f'from {len(units)} input units.',
      flush=True,
    )
  if not sample:
    raise ValueError(f'--input={",".join(inputs)}: no usable document to train on.')
  return train(sample, model_path, vocab_size, verbose=verbose)


def sample_texts(texts: Iterable[str], max_bytes: int) -> list[str]:
  """A uniform sample of texts, at most max_bytes in all, in bounded memory.

  Bottom-k by content hash: one pass, and the same sample whatever the order.
  """
  heap, total = [], 0  # Max-heap on the hash, as (-hash, text).
  for text in texts:
    size = len(text.encode())
    if size > max_bytes:
      continue
    heapq.heappush(heap, (-sources.unit_hash(text, 'tokenizer-sample'), text))
    total += size
    while total > max_bytes:
      _, dropped = heapq.heappop(heap)
      total -= len(dropped.encode())
  return [text for _, text in sorted(heap, reverse=True)]


def for_corpus(
  c_data: ml_collections.ConfigDict,
  vocab_size: int,
  *,
  cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
  """Returns the tokenizer for a corpus: `data.tokenizer`, or a default.

  For prepared data the default is the directory's tokenizer.model; otherwise
  one is trained once on the training split (never the held-out files) and
  cached under a key of everything that changes it, in `cache_dir` (default
  $CLM_JAX_CACHE/tokenizers, else ~/.cache/clm_jax/tokenizers). A given
  tokenizer may have fewer pieces than `vocab_size` (spare embedding rows),
  never more.
  """
  given, key = c_data.tokenizer, 'data.tokenizer'
  if c_data.source == 'prepared' and not given:
    key = 'data.path'
    # Prepared ids belong to the tokenizer stored beside them.
    given = pathlib.Path(c_data.path).expanduser() / TOKENIZER_FILE
    if not given.is_file():
      raise FileNotFoundError(
        f'data.path={c_data.path!r} has no tokenizer.model: it is not the output of '
        '`python -m launch data prepare`.'
      )
  if c_data.source == 'instruct' and not given:
    raise FileNotFoundError(
      "data.source='instruct' needs data.tokenizer: the pre-trained model's tokenizer.model "
      '(or train.init_from, whose tokenizer is then used).'
    )
  if given:
    tokenizer = load(given)
    if tokenizer.vocab_size > vocab_size:
      raise ValueError(
        f'{key}: tokenizer {given} has {tokenizer.vocab_size} pieces but '
        f'model.vocab_size={vocab_size}; raise model.vocab_size.'
      )
    return tokenizer
  root = sources.corpus_root(c_data)
  path = pathlib.Path(cache_dir or _default_cache_dir()).expanduser()
  path = path / f'{_cache_key(c_data, root, vocab_size)}.model'
  if path.is_file():
    return load(path)
  files = sources.list_files(c_data)
  train_files, _ = sources.split_files(files, root, c_data.heldout_fraction)
  sample = _sample(train_files, root, int(c_data.tokenizer_sample_mb * 2**20))
  return train(sample, path, vocab_size)


def _cache_key(c_data: ml_collections.ConfigDict, root: pathlib.Path, vocab_size: int) -> str:
  root_hash = hashlib.sha256(str(root).encode()).hexdigest()[:12]
  python = f'{sys.version_info.major}.{sys.version_info.minor}'
  return (
    f'{c_data.source}-{root_hash}-py{python}-v{vocab_size}'
    f'-s{c_data.tokenizer_sample_mb:g}mb-h{c_data.heldout_fraction:g}'
    f'-r{_RECIPE_VERSION}'
  )


def _default_cache_dir() -> pathlib.Path:
  base = os.environ.get('CLM_JAX_CACHE') or '~/.cache/clm_jax'
  return pathlib.Path(base).expanduser() / 'tokenizers'


def _sample(files: Sequence[pathlib.Path], root: pathlib.Path, max_bytes: int) -> Iterator[str]:
  """Yields whole files in a fixed pseudo-random order until max_bytes."""
  # A salted hash orders the files independently of the held-out split's hash.
  order = sorted(
    files,
    key=lambda p: sources.unit_hash(p.relative_to(root).as_posix(), 'tokenizer'),
  )
  total = 0
  for path in order:
    if total >= max_bytes:
      return
    text = sources.read_text(path)
    total += len(text.encode())
    yield text


def _sentences(texts: Iterable[str], max_bytes: int, counts: dict[str, int]) -> Iterator[str]:
  """Cuts texts into sentences of whole lines, each at most max_bytes."""
  for text in texts:
    counts['texts'] += 1
    counts['bytes'] += len(text.encode())
    lines, size = [], 0
    for line in _short_lines(text, max_bytes):
      line_bytes = len(line.encode())
      if lines and size + line_bytes > max_bytes:
        yield ''.join(lines)
        lines, size = [], 0
      lines.append(line)
      size += line_bytes
    if lines:
      yield ''.join(lines)


def _short_lines(text: str, max_bytes: int) -> Iterator[str]:
  """Yields the lines of text (ends kept), cutting any over max_bytes."""
  # A character is at most 4 UTF-8 bytes, so this many always fit.
  step = max(1, max_bytes // 4)
  for line in text.splitlines(keepends=True):
    if len(line.encode()) <= max_bytes:
      yield line
    else:
      for start in range(0, len(line), step):
        yield line[start : start + step]


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  # The temporary file sits in the same directory so os.replace is a rename,
  # atomic on POSIX: concurrent hosts training the same key never see a torn
  # model, and the last finished one wins.
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
