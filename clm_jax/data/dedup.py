"""Exact and near deduplication of documents.

Workers fingerprint each document with `content_hash` (exact) and `signature`
(MinHash of its word 5-gram shingles); one `Deduplicator` in the main process
then sees the fingerprints in a fixed order and keeps the first of each group
of copies. Near copies are found with datasketch's MinHash LSH, and every LSH
candidate is verified against the Jaccard threshold before it counts.

Signatures are only comparable when computed by the same code with the same
datasketch version (the permutation scheme and seed are fixed here).
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
  """SHA-256 digest of the document's exact UTF-8 bytes, for exact deduplication.

  Lone surrogates (from undecodable input) are encoded as they are rather than
  raising, so every str has a digest.
  """
  return hashlib.sha256(text.encode('utf-8', 'surrogatepass')).digest()


def signature(text: str, *, num_perm: int = 128, ngram: int = 5) -> np.ndarray:
  """MinHash signature of the document's word n-gram shingles.

  Words are the text split on non-identifier characters (regex \\W+), so that
  differences in whitespace, indentation and punctuation matter little. Each
  run of `ngram` consecutive words is a shingle; a document with fewer words
  is one shingle of all its words (none: the empty shingle). The signature is
  deterministic across processes and machines: it uses no salted hash(), only
  BLAKE2b, fixed constants and datasketch's seeded permutations.

  Args:
    text: The document.
    num_perm: MinHash permutations, i.e. the signature's length.
    ngram: Words per shingle.

  Returns:
    np.uint64 array of shape [num_perm], to compare with `Deduplicator`.

  Raises:
    ValueError: `num_perm` or `ngram` is out of range.
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

  A document is an exact duplicate when its content hash equals that of any
  earlier checked document, and a near duplicate when the Jaccard similarity
  estimated from the signatures of it and an earlier kept document is at least
  `threshold`. Only kept documents enter the LSH index (each once), so a
  document is compared with the first of each group of copies.
  """

  def __init__(self, *, threshold: float = 0.85, num_perm: int = 128):
    """Creates an empty index.

    Args:
      threshold: Jaccard similarity in (0, 1] from which a document is a near
        duplicate.
      num_perm: Length of the signatures that `check` takes.

    Raises:
      ValueError: `threshold` or `num_perm` is out of range.
    """
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

    Args:
      key: The document's name in the index; must differ from the keys of
        kept documents.
      digest: `content_hash` of the document.
      sig: `signature` of the document, computed with `num_perm`.

    Returns:
      'exact_duplicate' or 'near_duplicate' if an earlier document matches,
      else None (the document is kept).

    Raises:
      ValueError: `sig` is no uint64 array of `num_perm` values, or `key` is
        already kept.
      TypeError: `digest` is not bytes.
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

  Each distinct word is hashed once; a shingle's hash is the sum of its word
  hashes times per-position multipliers, mod 2^64, for all shingles at once.
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
  """Fixed odd 64-bit multipliers, one per position in a shingle.

  Distinct per position, so that the same words in another order hash
  differently; odd, so that each product keeps all the bits of its word hash.
  """
  return np.array(
    [_word_hash(b'position %d' % position) | 1 for position in range(ngram)], np.uint64
  )


@functools.cache
def _empty_minhash(num_perm: int) -> datasketch.MinHash:
  """A MinHash of nothing; copies of it share its permutations, made once per process."""
  # The shingles arrive already hashed, so the hash function passes them through.
  return datasketch.MinHash(num_perm=num_perm, seed=_SEED, scheme=_SCHEME, hashfunc=int)
