"""Corpus sources: which files make a corpus, and its train/held-out split.

A source is named by `data.source` and rooted at `data.path`. The split hashes
each file's path relative to the root, so every host and every machine agrees
on it whatever order the files were listed in, and adding a file never moves
another one across the split.
"""

import hashlib
import os
import pathlib
import sysconfig
from collections.abc import Sequence

import ml_collections

SOURCES = ('stdlib',)  # Values `data.source` may take.

# Bigger .py files are generated tables (unicode data, test vectors), not code.
_MAX_FILE_BYTES = 1 << 20
# Third-party code installed next to the standard library is not part of it.
_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})


def corpus_root(c_data: ml_collections.ConfigDict) -> pathlib.Path:
  """Returns the resolved root directory of the corpus.

  Args:
    c_data: The `data` config subtree.

  Raises:
    ValueError: `data.source` is not one of `SOURCES`.
    FileNotFoundError: The root (`data.path`, or the default) is no directory.
  """
  if c_data.source not in SOURCES:
    raise ValueError(f'data.source={c_data.source!r} is unknown; expected one of {SOURCES}.')
  root = pathlib.Path(c_data.path or sysconfig.get_paths()['stdlib']).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f'data.path={c_data.path!r}: corpus directory {root} does not exist.')
  return root.resolve()


def list_files(c_data: ml_collections.ConfigDict) -> list[pathlib.Path]:
  """Lists the corpus files, sorted by their path relative to the root.

  For source 'stdlib' these are the *.py files under the root, outside
  site-packages and dist-packages, that are valid UTF-8, at most 1 MiB and not
  blank (empty `__init__.py` files would teach the model only BOS then EOS).

  Args:
    c_data: The `data` config subtree.

  Returns:
    Absolute paths under `corpus_root(c_data)`.

  Raises:
    ValueError: Unknown `data.source`, or no usable file under the root.
    FileNotFoundError: `data.path` does not exist.
  """
  root = corpus_root(c_data)
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruning in place keeps os.walk out of site-packages, which can hold
    # many times more files than the standard library itself.
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    for name in filenames:
      path = pathlib.Path(dirpath, name)
      if name.endswith('.py') and _is_usable(path):
        files.append(path)
  files.sort(key=lambda p: p.relative_to(root).as_posix())
  if not files:
    raise ValueError(
      f'data.path={c_data.path!r}: no usable *.py file under {root} '
      f'(data.source={c_data.source!r}).'
    )
  return files


def split_files(
  files: Sequence[pathlib.Path], root: pathlib.Path, heldout_fraction: float
) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """Splits files into train and held-out sets by a hash of their path.

  Args:
    files: Corpus files, all under `root`.
    root: The corpus root; the hash covers the path relative to it, so the
      split does not depend on where the corpus is installed.
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


def unit_hash(text: str, salt: str = '') -> float:
  """Maps text to a float in [0, 1), the same on every machine and run.

  Python's hash() is salted per process, so a split made with it would differ
  between hosts; SHA-256 does not.

  Args:
    text: What to hash, e.g. a relative path.
    salt: Gives an independent hash for another purpose (e.g. sampling).
  """
  digest = hashlib.sha256(f'{salt}\0{text}'.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def read_text(path: pathlib.Path | str) -> str:
  """Reads a UTF-8 file exactly: CRLF stays CRLF, as the tokenizer sees it.

  Raises:
    UnicodeDecodeError: The file is not valid UTF-8.
  """
  with open(path, encoding='utf-8', newline='') as f:
    return f.read()


def _is_usable(path: pathlib.Path) -> bool:
  if not path.is_file() or path.stat().st_size > _MAX_FILE_BYTES:
    return False
  try:
    text = read_text(path)
  except (UnicodeDecodeError, OSError):
    return False
  return bool(text.strip())
