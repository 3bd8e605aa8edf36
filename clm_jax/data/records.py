"""Prepared data on disk: ArrayRecord shards of token arrays, and their manifest.

A prepared directory, as `data prepare` writes it:

  manifest.json      counts, options, tokenizer hash, and every shard below
  tokenizer.model    the tokenizer the ids belong to
  train/<language>-NNNNN.array_record
  heldout/<language>-NNNNN.array_record

One record is one document (no BOS / EOS; training adds them):

  uint32 little-endian n | n bytes of JSON {"language", "source"} | token ids

The ids are little-endian `manifest['dtype']` (uint16 when the vocabulary fits,
else uint32). The format holds no pickle, so reading data never runs code.
"""

import hashlib
import json
import os
import pathlib
import struct
import threading
from collections.abc import Sequence

import numpy as np
from array_record.python import array_record_module

FORMAT = 'clm_jax.prepared/1'
MANIFEST = 'manifest.json'
SPLITS = ('train', 'heldout')

_HEADER = struct.Struct('<I')
# One record per chunk gives random access to every record without decoding
# its neighbours, which a shuffled training read needs.
_WRITER_OPTIONS = 'group_size:1'
_READER_OPTIONS = 'readahead_buffer_size:0,max_parallelism:0'


class DataError(ValueError):
  """Prepared data is missing, corrupt, or does not fit the run."""


def token_dtype(vocab_size: int) -> str:
  """The narrowest unsigned dtype that holds every id of the vocabulary."""
  return 'uint16' if vocab_size <= 1 << 16 else 'uint32'


def encode(tokens: np.ndarray, dtype: str, *, language: str, source: str) -> bytes:
  """Serializes one document's ids and metadata as a record."""
  header = json.dumps({'language': language, 'source': source}).encode()
  ids = np.asarray(tokens).astype(np.dtype(dtype).newbyteorder('<'), copy=False)
  return _HEADER.pack(len(header)) + header + ids.tobytes()


def decode(record: bytes, dtype: str) -> tuple[np.ndarray, dict]:
  """Returns (int32 ids, metadata) of a record."""
  (size,) = _HEADER.unpack_from(record)
  meta = json.loads(record[_HEADER.size : _HEADER.size + size])
  return decode_tokens(record, dtype), meta


def decode_tokens(record: bytes, dtype: str) -> np.ndarray:
  """Returns the int32 ids of a record, skipping its metadata."""
  (size,) = _HEADER.unpack_from(record)
  ids = np.frombuffer(record, np.dtype(dtype).newbyteorder('<'), offset=_HEADER.size + size)
  return ids.astype(np.int32)


class ShardWriter:
  """Writes records to `path` under a temporary name, renamed on close.

  A shard either exists complete or not at all, so an interrupted run never
  leaves a truncated shard that a later run would take for a finished one.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._tmp = self.path.with_name(f'.{self.path.name}.tmp')
    self._writer = array_record_module.ArrayRecordWriter(str(self._tmp), _WRITER_OPTIONS)
    self.records = 0

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self.records += 1

  def close(self) -> None:
    self._writer.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    self._writer.close()
    self._tmp.unlink(missing_ok=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def read_shard(path: str | os.PathLike) -> list[bytes]:
  """Reads every record of a shard (for preparation and inspection)."""
  reader = _open(str(path))
  try:
    return reader.read_all()
  finally:
    reader.close()


class ShardedRecords:
  """Random access to the documents of several shards, as one sequence.

  A Grain data source: len() and [i] -> int32 ids. Shards open lazily, once
  per process (it pickles without its readers, for Grain's worker processes),
  and any failure names the shard.
  """

  def __init__(self, paths: Sequence[str], counts: Sequence[int], dtype: str):
    self._paths = [str(p) for p in paths]
    self._counts = [int(n) for n in counts]
    self._ends = np.cumsum(self._counts)
    self._dtype = dtype
    self._readers = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._ends[-1]) if self._paths else 0

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'Record {index} is out of range [0, {len(self)}).')
    shard = int(np.searchsorted(self._ends, index, side='right'))
    local = index - (int(self._ends[shard - 1]) if shard else 0)
    reader = self._reader(shard)
    try:
      (record,) = reader.read([local])
      return decode_tokens(record, self._dtype)
    except Exception as e:
      raise DataError(
        f'ArrayRecord shard {self._paths[shard]}: cannot read record {local}: {e}'
      ) from e

  def _reader(self, shard: int):
    reader = self._readers.get(shard)
    if reader is None:
      with self._lock:
        reader = self._readers.get(shard)
        if reader is None:
          reader = _open(self._paths[shard])
          if reader.num_records() != self._counts[shard]:
            raise DataError(
              f'ArrayRecord shard {self._paths[shard]} has {reader.num_records()} records; '
              f'the manifest says {self._counts[shard]}. Re-run `data prepare`.'
            )
          self._readers[shard] = reader
    return reader

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_readers'], state['_lock'] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


def _open(path: str):
  if not os.path.isfile(path):
    raise DataError(f'ArrayRecord shard {path} is missing. Re-run `data prepare`.')
  try:
    return array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
  except Exception as e:
    raise DataError(f'ArrayRecord shard {path} is corrupt or unreadable: {e}') from e


def read_manifest(directory: str | os.PathLike) -> dict:
  """Loads and checks a prepared directory's manifest.

  Raises:
    DataError: No manifest (not prepared, or the preparation did not finish),
      a manifest of another format, or a listed shard outside the directory,
      missing or of the wrong size.
  """
  directory = pathlib.Path(directory).expanduser()
  path = directory / MANIFEST
  if not path.is_file():
    raise DataError(
      f'data.path={str(directory)!r} has no {MANIFEST}: it is not the output of a finished '
      '`python -m launch data prepare`.'
    )
  try:
    manifest = json.loads(path.read_text())
  except ValueError as e:
    raise DataError(f'{path} is not valid JSON: {e}') from e
  if manifest.get('format') != FORMAT:
    raise DataError(f'{path} has format {manifest.get("format")!r}, expected {FORMAT!r}.')
  for split in SPLITS:
    for shard in manifest['splits'][split]:
      if not is_relative_name(shard['file']):
        # A manifest from elsewhere must not point the reader at other files.
        raise DataError(f'{path}: shard {shard["file"]!r} is outside {directory}: refused.')
      shard_path = directory / shard['file']
      if not shard_path.is_file():
        raise DataError(f'ArrayRecord shard {shard_path} is missing. Re-run `data prepare`.')
      if shard_path.stat().st_size != shard['bytes']:
        raise DataError(
          f'ArrayRecord shard {shard_path} has {shard_path.stat().st_size} bytes; the '
          f'manifest says {shard["bytes"]}: it is corrupt or from another preparation.'
        )
  return manifest


def is_relative_name(name: str) -> bool:
  """Whether `name` joined to a directory stays inside it: relative, no '..'.

  Checked on the name, not by resolving symlinks: a prepared directory may
  hold symlinks of its owner's (a split on another disk), never a name from
  data that climbs out of it.
  """
  path = pathlib.PurePath(name)
  return bool(name) and not path.is_absolute() and '..' not in path.parts


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()
