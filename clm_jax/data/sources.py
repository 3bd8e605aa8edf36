"""Where documents come from: source trees, JSONL dumps, Parquet files.

Two users read sources. `data prepare` reads any mix of inputs as work units
(a batch of files, one JSONL file, one Parquet row group) and turns each into
`Document`s or `Skipped` records, so a bad input is counted, never fatal.
Training on raw sources (`data.source` 'stdlib' or 'files') lists the code
files under one root and splits them into train and held-out sets.

Languages are the five of the original run plus 'text', natural language
about code (Markdown, reStructuredText, plain text).

Both read only what they were given. Under an input directory only regular
files are read; a symlink is never followed but counted by where it leads
('symlink_outside', 'symlink_loop', 'symlink_inside'), and a FIFO, socket or
device is counted as 'special_file' without being opened for reading. A
language label from a dump is one of LANGUAGES or becomes 'unknown', since it
names the output shard.
"""

import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import pathlib
import stat
import sysconfig
import zlib
from collections.abc import Iterator
from collections.abc import Sequence

import ml_collections
import pyarrow.parquet as pq

from clm_jax.config import schema

SOURCES = schema.SOURCES
LANGUAGES = schema.LANGUAGES

EXTENSIONS = {
  '.py': 'python',
  '.pyi': 'python',
  '.cc': 'cpp',
  '.cpp': 'cpp',
  '.cxx': 'cpp',
  '.c++': 'cpp',
  '.h': 'cpp',
  '.hh': 'cpp',
  '.hpp': 'cpp',
  '.hxx': 'cpp',
  '.java': 'java',
  '.js': 'javascript',
  '.mjs': 'javascript',
  '.cjs': 'javascript',
  '.jsx': 'javascript',
  '.go': 'go',
  '.md': 'text',
  '.markdown': 'text',
  '.rst': 'text',
  '.txt': 'text',
}
# Language names as dumps spell them (The Stack: 'C++', 'JavaScript', ...).
_ALIASES = {
  'c++': 'cpp',
  'js': 'javascript',
  'golang': 'go',
  'markdown': 'text',
  'restructuredtext': 'text',
  'rst': 'text',
  'plain text': 'text',
  'natural language': 'text',
}
# Drop reasons for inputs that are not usable text at all.
READ_REASONS = (
  'unsupported_extension',
  'unreadable',
  'special_file',  # A FIFO, socket or device: never read.
  'symlink_outside',  # Leads out of the input directory: not followed.
  'symlink_loop',  # A directory symlink to its own ancestor, or a cycle of symlinks.
  'symlink_inside',  # Leads inside the input directory, which is read under its own path.
  'binary',
  'encoding',
  'empty',
  'too_large',
  'bad_json',
  'missing_field',
  'truncated',  # A compressed stream ends early: the record being read and all after it.
)
JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz', '.json.gz', '.ndjson')

# Bigger .py files in the standard library are generated tables, not code.
_MAX_FILE_BYTES = 1 << 20
# Third-party code installed next to the standard library is not part of it,
# and no tree's VCS metadata or caches are code.
_EXCLUDED_DIRS = frozenset(
  {'site-packages', 'dist-packages', '__pycache__', '.git', '.hg', '.svn', 'node_modules'}
)
# O_NONBLOCK: opening a FIFO would wait for a writer forever; the fstat after
# the open refuses it, and on a regular file the flag changes nothing.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0)


class NotRegularFile(OSError):
  """A symlink, FIFO, socket, device or directory where a regular file is read."""


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  language: str
  source: str  # Where it came from: a path, 'dump.jsonl:12', 'x.parquet:row 5'.


@dataclasses.dataclass(frozen=True)
class Skipped:
  reason: str  # One of READ_REASONS.
  source: str
  damaged: bool = False  # The rest of an input file is lost with it: name the file.


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """How records of dumps map to documents, and what is too big."""

  text_field: str = 'content'  # Stack-style dumps keep the file text here.
  language_field: str = 'language'  # Optional; else the path field's extension.
  path_field: str = 'path'  # Optional; gives the language when the field above is absent.
  max_document_bytes: int = 1 << 20  # Bigger documents are data, not code: 'too_large'.


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of preparation work: some files, a JSONL file or a Parquet row group."""

  kind: str  # 'files', 'jsonl' or 'parquet'.
  path: str  # The JSONL / Parquet file, or the directory the files are under.
  files: tuple[str, ...] = ()
  row_group: int = -1

  @property
  def name(self) -> str:
    if self.kind == 'files':
      return f'{self.path} ({len(self.files)} files)'
    if self.kind == 'parquet':
      return f'{self.path} row group {self.row_group}'
    return self.path


def language_of(path: str | os.PathLike) -> str | None:
  """The language of a file by its extension, or None if not a corpus language."""
  name = os.fspath(path).lower()
  return EXTENSIONS.get(os.path.splitext(name)[1])


def normalize_language(value: str) -> str:
  """Maps a dump's language label ('C++', 'Python') to ours ('cpp', 'python').

  A label outside LANGUAGES ('Rust', '../../x') is 'unknown': languages name
  output files, so they come from a fixed set, never from the data.
  """
  key = value.strip().lower()
  language = _ALIASES.get(key, key)
  return language if language in LANGUAGES else 'unknown'


def open_regular(path: str | os.PathLike, *, follow_symlinks: bool = False) -> io.BufferedReader:
  """Opens a regular file to read; never blocks on a FIFO or reads a device.

  The type is checked on the opened descriptor (fstat), so a file swapped
  after a listing is caught too.

  Args:
    path: The file.
    follow_symlinks: Open what a final symlink leads to; False refuses it
      (O_NOFOLLOW).

  Raises:
    NotRegularFile: path is a symlink (unless followed), FIFO, socket, device
      or directory.
    OSError: It cannot be opened.
  """
  flags = _OPEN_FLAGS | (0 if follow_symlinks else getattr(os, 'O_NOFOLLOW', 0))
  try:
    fd = os.open(path, flags)
  except OSError as e:
    if e.errno == errno.ELOOP and not follow_symlinks:
      raise NotRegularFile(f'{os.fspath(path)} is a symlink: not followed.') from e
    raise
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise NotRegularFile(
        f'{os.fspath(path)} is not a regular file (a FIFO, socket, device or directory): not read.'
      )
    return os.fdopen(fd, 'rb')
  except BaseException:
    os.close(fd)
    raise


def list_units(inputs: Sequence[str], *, files_per_unit: int = 256) -> list[Unit]:
  """Splits inputs into preparation units, in an order fixed by the inputs.

  Args:
    inputs: Directories (every file under them, recursively), JSONL / JSONL.gz
      files, Parquet files, or single source files.
    files_per_unit: Files of a directory per unit; units are the grain of
      parallelism and of resuming an interrupted preparation.

  Raises:
    FileNotFoundError: An input does not exist.
  """
  units = []
  for raw in inputs:
    path = pathlib.Path(raw).expanduser()
    if path.is_symlink() and not path.is_dir():
      # A file named on the command line is what the user chose, even through
      # a symlink; only what lies under a named directory is confined to it.
      path = path.resolve()
    if path.is_dir():
      files = _walk(path)
      for start in range(0, len(files), files_per_unit):
        chunk = tuple(str(p) for p in files[start : start + files_per_unit])
        units.append(Unit('files', str(path), chunk))
    elif not path.exists():
      raise FileNotFoundError(f'--input: {path} does not exist.')
    elif path.name.lower().endswith(JSONL_SUFFIXES):
      units.append(Unit('jsonl', str(path)))
    elif path.name.lower().endswith('.parquet'):
      units.extend(Unit('parquet', str(path), row_group=i) for i in range(_row_groups(path)))
    else:
      units.append(Unit('files', str(path.parent), (str(path),)))
  return units


def read_unit(unit: Unit, options: ReadOptions) -> Iterator[Document | Skipped]:
  """Yields a unit's documents, and a `Skipped` for each unusable input in it."""
  if unit.kind == 'files':
    for path in unit.files:
      yield read_file(path, options, root=unit.path)
  elif unit.kind == 'jsonl':
    yield from _read_jsonl(unit.path, options)
  elif unit.kind == 'parquet':
    yield from _read_parquet(unit.path, unit.row_group, options)
  else:
    raise ValueError(f'Unknown unit kind {unit.kind!r}.')


def read_file(
  path: str, options: ReadOptions, root: str | os.PathLike | None = None
) -> Document | Skipped:
  """Reads one source file, or says why it is not a usable document.

  Args:
    path: The file.
    options: The size limit.
    root: The input directory `path` was found under: a symlink is not
      followed but skipped by where it leads (see READ_REASONS). None: the
      path was named by the user, and a symlink is followed.
  """
  try:
    mode = os.lstat(path).st_mode
  except OSError:
    return Skipped('unreadable', path)
  if stat.S_ISLNK(mode) and root is not None:
    return Skipped(_symlink_reason(path, root), path)
  if stat.S_ISDIR(mode):  # A directory os.walk could not list.
    return Skipped('unreadable', path)
  if not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
    return Skipped('special_file', path)
  language = language_of(path)
  if language is None:
    return Skipped('unsupported_extension', path)
  try:
    with open_regular(path, follow_symlinks=root is None) as f:
      # At most one byte past the limit, whatever a stat said: a file can
      # grow, and some (in /proc) report size 0.
      data = f.read(options.max_document_bytes + 1)
  except NotRegularFile:
    return Skipped('special_file', path)
  except OSError:
    return Skipped('unreadable', path)
  return _document(data, language, path, options)


def _within(path: str, directory: str) -> bool:
  return os.path.commonpath([path, directory]) == directory


def _symlink_reason(path: str, root: str | os.PathLike) -> str:
  """Where a symlink under root leads, as a skip reason."""
  target = os.path.realpath(path)
  if not _within(target, os.path.realpath(root)):
    return 'symlink_outside'
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    return 'symlink_loop' if e.errno == errno.ELOOP else 'unreadable'
  if stat.S_ISDIR(mode) and _within(os.path.realpath(os.path.dirname(path)), target):
    return 'symlink_loop'
  return 'symlink_inside'


def _document(data: bytes, language: str, source: str, options: ReadOptions):
  if len(data) > options.max_document_bytes:
    return Skipped('too_large', source)
  if b'\0' in data:
    return Skipped('binary', source)
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError:
    return Skipped('encoding', source)
  return _text_document(text, language, source)


def _text_document(text: str, language: str, source: str):
  if not text.strip():
    return Skipped('empty', source)
  if '\0' in text:
    return Skipped('binary', source)
  return Document(text, language, source)


def _record_language(record: dict, options: ReadOptions) -> str:
  value = record.get(options.language_field) if options.language_field else None
  if isinstance(value, str) and value:
    return normalize_language(value)  # Never a path: it names a shard.
  path = record.get(options.path_field) if options.path_field else None
  if isinstance(path, str):
    return language_of(path) or 'unknown'
  return 'unknown'


def _record_document(record, options: ReadOptions, source: str):
  if not isinstance(record, dict):
    return Skipped('bad_json', source)
  text = record.get(options.text_field)
  if not isinstance(text, str):
    return Skipped('missing_field', source)
  if len(text) > options.max_document_bytes or len(text.encode()) > options.max_document_bytes:
    return Skipped('too_large', source)
  return _text_document(text, _record_language(record, options), source)


def _read_jsonl(path: str, options: ReadOptions) -> Iterator[Document | Skipped]:
  try:
    raw = open_regular(path, follow_symlinks=True)  # Named by the user.
  except NotRegularFile:
    yield Skipped('special_file', path, damaged=True)
    return
  except OSError:
    yield Skipped('unreadable', path, damaged=True)
    return
  # The longest line read whole: a document at the size limit JSON-escaped
  # (at most 6 bytes per byte, as \uXXXX) with room for its other fields. A
  # longer one is skipped in pieces, so no line (nor gzip bomb) fills memory.
  max_line = 6 * options.max_document_bytes + (1 << 16)
  line_number = 0
  with raw:
    f = gzip.GzipFile(fileobj=raw, mode='rb') if path.lower().endswith('.gz') else raw
    try:
      while line := f.readline(max_line + 1):
        line_number += 1
        source = f'{path}:{line_number}'
        if len(line) > max_line and not line.endswith(b'\n'):
          while (rest := f.readline(1 << 20)) and not rest.endswith(b'\n'):
            pass
          yield Skipped('too_large', source)
          continue
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except UnicodeDecodeError:
          yield Skipped('encoding', source)
          continue
        except ValueError:
          yield Skipped('bad_json', source)
          continue
        yield _record_document(record, options, source)
    except EOFError:
      # The stream ends early: every whole line before was read; the one being
      # read is lost, and how many came after it no reader can know.
      yield Skipped('truncated', f'{path}:{line_number + 1}', damaged=True)
    except (OSError, zlib.error):  # gzip.BadGzipFile is an OSError.
      yield Skipped('unreadable', f'{path}:{line_number + 1}', damaged=True)


def _row_groups(path: pathlib.Path) -> int:
  try:
    with open_regular(path, follow_symlinks=True) as f:
      return pq.ParquetFile(f).num_row_groups
  except Exception:  # noqa: BLE001  pyarrow raises many types; the unit reports it.
    return 1  # One unit that reads as 'unreadable'.


def _read_parquet(path: str, row_group: int, options: ReadOptions):
  source = f'{path} row group {row_group}'
  try:
    # Opened here, not by pyarrow: a FIFO named *.parquet must not block.
    with open_regular(path, follow_symlinks=True) as f:
      pf = pq.ParquetFile(f)
      names = set(pf.schema_arrow.names)
      columns = [
        name
        for name in (options.text_field, options.language_field, options.path_field)
        if name and name in names
      ]
      table = pf.read_row_group(row_group, columns=columns)
  except NotRegularFile:
    yield Skipped('special_file', source, damaged=True)
    return
  except Exception:  # noqa: BLE001
    yield Skipped('unreadable', source, damaged=True)
    return
  offset = sum(pf.metadata.row_group(i).num_rows for i in range(row_group))
  for i, record in enumerate(table.to_pylist()):
    yield _record_document(record, options, f'{path}:row {offset + i}')


def _walk(root: pathlib.Path) -> list[pathlib.Path]:
  """Every entry under root to read or to count, sorted by relative path.

  Files of any type, symlinks to directories (never descended: `read_file`
  counts them) and directories that cannot be listed, outside excluded
  directories.
  """
  entries = []
  for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: entries.append(e.filename)):
    # Pruning in place keeps os.walk out of site-packages, which can hold many
    # times more files than the standard library itself.
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
    entries.extend(os.path.join(dirpath, name) for name in filenames + links)
  files = [pathlib.Path(entry) for entry in entries]
  files.sort(key=lambda p: p.relative_to(root).as_posix())
  return files


def corpus_root(c_data: ml_collections.ConfigDict) -> pathlib.Path:
  """Returns the resolved root directory of a raw-source corpus.

  Args:
    c_data: The `data` config subtree, with source 'stdlib' or 'files'.

  Raises:
    ValueError: `data.source` is not a raw source.
    FileNotFoundError: The root (`data.path`, or the default) is no directory.
  """
  if c_data.source not in ('stdlib', 'files'):
    raise ValueError(f'data.source={c_data.source!r} is not a raw-source corpus.')
  if c_data.source == 'files' and not c_data.path:
    raise ValueError("data.source='files' needs data.path, the root of the source tree.")
  root = pathlib.Path(c_data.path or sysconfig.get_paths()['stdlib']).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f'data.path={c_data.path!r}: corpus directory {root} does not exist.')
  return root.resolve()


def list_files(c_data: ml_collections.ConfigDict) -> list[pathlib.Path]:
  """Lists the files of a raw-source corpus, sorted by path relative to the root.

  These are the regular files (no symlinks, FIFOs or devices) of a corpus
  language (for 'stdlib', only *.py) outside excluded directories
  (site-packages, VCS metadata) that are valid UTF-8, at most 1 MiB and not
  blank (empty `__init__.py` files would teach the model only BOS then EOS).

  Args:
    c_data: The `data` config subtree.

  Returns:
    Absolute paths under `corpus_root(c_data)`.

  Raises:
    ValueError: Not a raw source, or no usable file under the root.
    FileNotFoundError: `data.path` does not exist.
  """
  root = corpus_root(c_data)
  options = ReadOptions(max_document_bytes=_MAX_FILE_BYTES)
  files = []
  for path in _walk(root):
    # The standard library's corpus is its *.py files, as it always was.
    if c_data.source == 'stdlib' and path.suffix != '.py' or language_of(path) is None:
      continue
    # Regular files only: a symlink is skipped even when it stays inside the
    # root, where it would only repeat a file in the corpus.
    if isinstance(read_file(str(path), options, root=root), Document):
      files.append(path)
  if not files:
    raise ValueError(
      f'data.path={c_data.path!r}: no usable source file under {root} '
      f'(data.source={c_data.source!r}).'
    )
  return files


def split_files(
  files: Sequence[pathlib.Path], root: pathlib.Path, heldout_fraction: float
) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """Splits files into train and held-out sets by a hash of their path.

  The hash covers the path relative to the root, so every host and machine
  agrees on the split whatever order the files were listed in, and adding a
  file never moves another one across it.

  Args:
    files: Corpus files, all under `root`.
    root: The corpus root.
    heldout_fraction: Expected fraction of files held out, in [0, 1).

  Returns:
    (train_files, heldout_files), disjoint, each in the order of `files`. When
    `heldout_fraction` > 0 the held-out list has at least one file even if no
    hash fell below the fraction.

  Raises:
    ValueError: The fraction is out of range, or leaves no training file.
  """
  if not 0 <= heldout_fraction < 1:
    raise ValueError(f'data.heldout_fraction={heldout_fraction} must be in [0, 1).')
  root = pathlib.Path(root)
  keys = {path: unit_hash(path.relative_to(root).as_posix()) for path in files}
  heldout = {path for path, key in keys.items() if key < heldout_fraction}
  if heldout_fraction > 0 and not heldout and keys:
    heldout = {min(keys, key=keys.get)}
  train = [path for path in files if path not in heldout]
  if not train:
    raise ValueError(
      f'data.heldout_fraction={heldout_fraction} leaves no training file '
      f'among {len(files)} under {root}.'
    )
  return train, [path for path in files if path in heldout]


def unit_hash(text: str | bytes, salt: str = '') -> float:
  """Maps text to a float in [0, 1), the same on every machine and run.

  Python's hash() is salted per process, so a split made with it would differ
  between hosts; SHA-256 does not.

  Args:
    text: What to hash, e.g. a relative path or a content digest.
    salt: Gives an independent hash for another purpose (e.g. sampling).
  """
  data = text if isinstance(text, bytes) else text.encode()
  digest = hashlib.sha256(salt.encode() + b'\0' + data).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def stable_int(text: str) -> int:
  """A non-negative int of text, the same everywhere (e.g. a per-language seed)."""
  return int(unit_hash(text, 'int') * 2**31)


def read_text(path: pathlib.Path | str) -> str:
  """Reads a UTF-8 regular file exactly: CRLF stays CRLF, as the tokenizer sees it.

  Raises:
    NotRegularFile: path is a symlink, FIFO, socket or device (a corpus
      file swapped after `list_files` listed it).
    UnicodeDecodeError: The file is not valid UTF-8.
  """
  with open_regular(path) as f:
    return f.read().decode('utf-8')
