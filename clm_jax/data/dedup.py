"""Exact and near deduplication of documents.

Workers fingerprint documents (`content_hash`, and `signature`: MinHash of word
5-grams); one `Deduplicator` sees them in a fixed order and keeps the first of
each group of copies, verifying every MinHash LSH candidate against the Jaccard
threshold. Signatures compare only across the same code and datasketch version.
"""

import functools
import hashlib
import re
import string

import datasketch
import numpy as np

# datasketch's 64-bit permutation scheme gives np.uint64 hash values directly, and its
# seeded permutations are the same in every process and on every machine.
_SCHEME = 'affine64'
_SEED = 1
# Values of the (shingles x num_perm) arrays of one MinHash.update_batch call: 512 KiB
# keeps them in cache (measured: 2x faster than 1 MiB) and memory bounded on huge files.
_BATCH_VALUES = 1 << 16
# LSH banding weighted towards recall (false positive weight, false negative weight):
# candidates are verified anyway, so a missed copy costs more than an extra check.
# At threshold 0.85, documents of Jaccard 0.85 / 0.9 are candidates 93% / 99% of the time.
_LSH_WEIGHTS = (0.05, 0.95)
_NON_WORD = re.compile(r'\W+')
# For ASCII text, \W+ is every byte outside [A-Za-z0-9_]: mapping those to spaces lets
# bytes.split find the same words many times faster than the regex.
_WORD_BYTES = (string.ascii_letters + string.digits + '_').encode()
_NON_WORD_BYTES = bytes(b for b in range(256) if b not in _WORD_BYTES)
_NON_WORD_TO_SPACE = bytes.maketrans(_NON_WORD_BYTES, b' ' * len(_NON_WORD_BYTES))

EXACT_DUPLICATE = 'exact_duplicate'
NEAR_DUPLICATE = 'near_duplicate'


def content_hash(text: str) -> bytes:
  """SHA-256 of the document's UTF-8 bytes; lone surrogates pass, so every str has one."""
  return hashlib.sha256(text.encode('utf-8', 'surrogatepass')).digest()


def signature(text: str, *, num_perm: int = 128, ngram: int = 5) -> np.ndarray:
  """MinHash signature (np.uint64 [num_perm]) of the document's word n-grams.

  Words split on \\W+, so whitespace and punctuation matter little; a document
  shorter than `ngram` words is one shingle. Deterministic across processes and
  machines: no salted hash(), only BLAKE2b and seeded permutations.
  """
  if ngram < 1:
    raise ValueError(f'ngram={ngram} must be positive.')
  if num_perm < 1:
    raise ValueError(f'num_perm={num_perm} must be positive.')
  hashes = _shingle_hashes(_words(text), ngram)
  minhash = _empty_minhash(num_perm).copy()
  batch = max(_BATCH_VALUES // num_perm, 1)
  for start in range(0, len(hashes), batch):
    minhash.update_batch(hashes[start : start + batch].tolist())
  return minhash.hashvalues


class Deduplicator:
  """Keeps the first occurrence of each document; later exact or near copies are reported.

  Near duplicate: estimated Jaccard similarity to an earlier kept document of at
  least `threshold`, in (0, 1]. Only kept documents enter the LSH index, so a
  document is compared with the first of each group of copies.
  """

  def __init__(self, *, threshold: float = 0.85, num_perm: int = 128):
    if not 0 < threshold <= 1:
      raise ValueError(f'threshold={threshold} must be in (0, 1].')
    if isinstance(num_perm, bool) or not isinstance(num_perm, int) or num_perm < 2:
      raise ValueError(f'num_perm={num_perm!r} must be an int >= 2.')
    try:
      self._lsh = datasketch.MinHashLSH(
        threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS
      )
    except ValueError:
      # Near threshold 1 datasketch's optimizer picks a single band, which it then
      # rejects; two bands of half the signature still find every equal signature.
      self._lsh = datasketch.MinHashLSH(num_perm=num_perm, params=(2, num_perm // 2))
    self.threshold = threshold
    self.num_perm = num_perm
    self._digests: set[bytes] = set()  # Of every checked document.
    # Key -> MinHash of every kept document, to verify the LSH candidates.
    self._kept: dict[str, datasketch.LeanMinHash] = {}

  def check(self, key: str, digest: bytes, sig: np.ndarray) -> str | None:
    """Checks a document against the earlier ones; remembers it if it is kept.

    Returns EXACT_DUPLICATE or NEAR_DUPLICATE, or None when kept. `key` must
    differ from the keys of kept documents.
    """
    if not isinstance(digest, bytes):
      raise TypeError(f'digest must be bytes, got {type(digest).__name__}.')
    sig = np.asarray(sig)
    if sig.dtype != np.uint64 or sig.shape != (self.num_perm,):
      raise ValueError(
        f'Signature of {key!r} is a {sig.dtype} array of shape {sig.shape}; expected '
        f'uint64 of shape ({self.num_perm},) (num_perm={self.num_perm}).'
      )
    if key in self._kept:
      raise ValueError(f'Key {key!r} is already kept; keys must be unique.')
    if digest in self._digests:
      return EXACT_DUPLICATE
    self._digests.add(digest)
    minhash = datasketch.LeanMinHash(seed=_SEED, hashvalues=sig, scheme=_SCHEME)
    for candidate in self._lsh.query(minhash):
      if minhash.jaccard(self._kept[candidate]) >= self.threshold:
        return NEAR_DUPLICATE
    self._lsh.insert(key, minhash, check_duplication=False)
    self._kept[key] = minhash
    return None


def _words(text: str) -> list[bytes]:
  """The text split on \\W+ (without the empty strings at the ends), as UTF-8."""
  if text.isascii():
    return text.encode('ascii').translate(_NON_WORD_TO_SPACE).split()
  return [word.encode('utf-8', 'surrogatepass') for word in _NON_WORD.split(text) if word]


def _shingle_hashes(words: list[bytes], ngram: int) -> np.ndarray:
  """The distinct 64-bit hashes of the word n-grams (the whole sequence if shorter).

  A shingle's hash is the sum of its word hashes times per-position multipliers,
  mod 2^64: each distinct word is hashed once, all shingles at once.
  """
  unique = dict.fromkeys(words)
  for word in unique:
    unique[word] = _word_hash(word)
  word_hashes = np.fromiter(map(unique.__getitem__, words), np.uint64, len(words))
  count = max(len(words) - ngram + 1, 1)
  multipliers = _position_multipliers(ngram)
  hashes = np.zeros(count, np.uint64)
  for position in range(min(ngram, len(words))):
    hashes += word_hashes[position : position + count] * multipliers[position]
  return np.unique(hashes)


def _word_hash(word: bytes) -> int:
  return int.from_bytes(hashlib.blake2b(word, digest_size=8).digest(), 'little')


@functools.cache
def _position_multipliers(ngram: int) -> np.ndarray:
  """Per-position shingle multipliers: distinct, so order matters; odd, so no bits are lost."""
  return np.array(
    [_word_hash(b'position %d' % position) | 1 for position in range(ngram)], np.uint64
  )


@functools.cache
def _empty_minhash(num_perm: int) -> datasketch.MinHash:
  """A MinHash of nothing; copies of it share its permutations, made once per process."""
  # The shingles arrive already hashed, so the hash function passes them through.
  return datasketch.MinHash(num_perm=num_perm, seed=_SEED, scheme=_SCHEME, hashfunc=int)
