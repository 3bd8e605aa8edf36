"""Fill-in-the-middle (FIM) as CodeLlama trains it, after Bavarian et al. 2022.

With probability `fim_rate` a document is cut at two character positions,
drawn independently and uniformly from [0, len(text)] and sorted, into
prefix / middle / suffix, and rearranged so that the middle comes last:

  PSM: <PRE> enc(prefix) <SUF> enc(suffix) <MID> enc(middle) <EOT>
  SPM: <PRE> <SUF> enc(suffix) <MID> enc(prefix) enc(middle) <EOT>

SPM is chosen with probability `spm_rate` (CodeLlama: half of them). Each part
is encoded on its own because an infilling prompt's parts are encoded on their
own at inference, and the model must see the same tokens in training. Cuts
are str indices, i.e. between code points, so no part ends inside a UTF-8
sequence. BOS/EOS are not added here: the caller wraps every document, FIM or
not, in [bos] ... [eos].

Every call draws a fixed number of doubles from the generator whichever way it
goes (`Generator.integers` may redraw on rejection, `random` never does), so
a pipeline's later randomness does not depend on earlier documents.
"""

import math

import numpy as np

from clm_jax.data import tokenizer as tokenizer_lib

# Doubles permute() draws: two cut positions, then PSM vs SPM.
_PERMUTE_DRAWS = 3


def check_tokenizer(tokenizer: tokenizer_lib.Tokenizer) -> None:
  """Checks that `tokenizer` has all four infilling sentinels.

  Args:
    tokenizer: The tokenizer FIM documents will be encoded with.

  Raises:
    ValueError: Some sentinel is missing; the message names the missing
      pieces.
  """
  missing = [
    tokenizer_lib.SENTINEL_PIECES[role]
    for role in tokenizer_lib.SENTINEL_PIECES
    if tokenizer.sentinels.get(role) is None
  ]
  if missing:
    name = getattr(tokenizer, 'path', tokenizer)
    pieces = ', '.join(missing)
    raise ValueError(
      f'Fill-in-the-middle needs the sentinel pieces {pieces}, which '
      f'the tokenizer {name!r} lacks (a LLaMA-2 tokenizer has none of them); use '
      'a tokenizer with them or set data.fim_rate=0.'
    )


def permute(
  text: str,
  rng: np.random.Generator,
  tokenizer: tokenizer_lib.Tokenizer,
  *,
  spm_rate: float = 0.5,
) -> np.ndarray:
  """Always applies FIM to one document.

  Args:
    text: The document.
    rng: Draws the two cut positions and the layout; exactly 3 doubles.
    tokenizer: Encodes the parts; must have all four sentinels.
    spm_rate: Probability of the SPM layout rather than PSM.

  Returns:
    int32 ids in PSM or SPM layout (see the module docstring), without BOS or
    EOS. An empty text gives the four sentinels around empty parts.

  Raises:
    ValueError: `spm_rate` is not in [0, 1], or a sentinel is missing.
  """
  _check_rate(spm_rate, 'data.fim_spm_rate')
  check_tokenizer(tokenizer)
  return _arrange(text, rng.random(_PERMUTE_DRAWS), tokenizer, spm_rate)


def maybe_permute(
  tokens: np.ndarray,
  rng: np.random.Generator,
  tokenizer: tokenizer_lib.Tokenizer,
  *,
  fim_rate: float,
  spm_rate: float = 0.5,
) -> np.ndarray:
  """Applies FIM to a document's ids with probability `fim_rate`.

  Always draws 4 doubles from `rng`: one for the FIM decision, then the 3 of
  permute(), so with fim_rate=1 the result equals permute() on a generator
  that had one double drawn first.

  Args:
    tokens: The document's ids, without BOS or EOS.
    rng: The generator for the decision, the cuts and the layout.
    tokenizer: Decodes `tokens` and encodes the parts. Sentinels are checked
      whenever fim_rate > 0, so a bad tokenizer fails on the first document
      rather than on the first one drawn for FIM.
    fim_rate: Probability of applying FIM (`data.fim_rate`).
    spm_rate: Probability of SPM among FIM documents (`data.fim_spm_rate`).

  Returns:
    int32 ids: the FIM layout, or `tokens` unchanged. An empty document is
    always returned unchanged, as FIM would only add sentinels to it.

  Raises:
    ValueError: A rate is not in [0, 1], `tokens` is not 1-D, or fim_rate > 0
      and a sentinel is missing.
  """
  _check_rate(fim_rate, 'data.fim_rate')
  _check_rate(spm_rate, 'data.fim_spm_rate')
  tokens = np.asarray(tokens, dtype=np.int32)
  if tokens.ndim != 1:
    raise ValueError(f'tokens must be 1-D, got shape {tokens.shape}.')
  if fim_rate > 0:
    check_tokenizer(tokenizer)
  draws = rng.random(1 + _PERMUTE_DRAWS)
  if draws[0] >= fim_rate or not tokens.size:
    return tokens
  return _arrange(tokenizer.decode(tokens), draws[1:], tokenizer, spm_rate)


def restore(ids: np.ndarray, tokenizer: tokenizer_lib.Tokenizer) -> str:
  """Returns the document a FIM sequence came from: prefix + middle + suffix.

  Args:
    ids: PSM or SPM ids as permute() makes them (no BOS or EOS), or ids with
      no sentinels at all.
    tokenizer: The tokenizer that made `ids`.

  Returns:
    The original text, or decode(ids) for ids without sentinels.

  Raises:
    ValueError: `ids` hold sentinels but not in PSM or SPM layout, or the
      tokenizer lacks some sentinel.
  """
  ids = np.asarray(ids).reshape(-1)
  present = [i for i in tokenizer.sentinels.values() if i is not None]
  if not np.isin(ids, present).any():
    return tokenizer.decode(ids)
  check_tokenizer(tokenizer)
  s = tokenizer.sentinels
  where = {role: np.flatnonzero(ids == s[role]) for role in tokenizer_lib.SENTINEL_PIECES}
  counts = {role: len(w) for role, w in where.items()}
  if any(n != 1 for n in counts.values()):
    raise ValueError(f'Not a FIM sequence: want one of each sentinel, found {counts}.')
  pre, suf, mid, eot = (int(where[role][0]) for role in ('prefix', 'suffix', 'middle', 'eot'))
  if not (pre == 0 and pre < suf < mid < eot == len(ids) - 1):
    raise ValueError(
      'Not a FIM sequence: want <PRE> first, then <SUF>, <MID>, and <EOT> last; '
      f'found them at {pre}, {suf}, {mid}, {eot} of {len(ids)} ids.'
    )
  # PSM with an empty prefix and SPM are the same ids, and both read back as
  # (what follows <MID>) + suffix, so the two need not be told apart.
  prefix = tokenizer.decode(ids[1:suf])
  suffix = tokenizer.decode(ids[suf + 1 : mid])
  middle = tokenizer.decode(ids[mid + 1 : eot])
  return prefix + middle + suffix


def _arrange(
  text: str, draws: np.ndarray, tokenizer: tokenizer_lib.Tokenizer, spm_rate: float
) -> np.ndarray:
  """Cuts `text` where draws[0:2] say and lays it out as draws[2] says."""
  n = len(text)
  # floor(u * (n + 1)) is uniform over the n + 1 cut points [0, n]; min()
  # guards the rounding of u * (n + 1) up to n + 1 for u just below 1.
  lo, hi = sorted(min(math.floor(u * (n + 1)), n) for u in draws[:2])
  prefix, middle, suffix = text[:lo], text[lo:hi], text[hi:]
  s = tokenizer.sentinels
  if draws[2] < spm_rate:
    ids = [s['prefix'], s['suffix'], *tokenizer.encode(suffix), s['middle']]
    ids += tokenizer.encode(prefix)
  else:
    ids = [s['prefix'], *tokenizer.encode(prefix), s['suffix'], *tokenizer.encode(suffix)]
    ids.append(s['middle'])
  ids += tokenizer.encode(middle)
  ids.append(s['eot'])
  return np.array(ids, dtype=np.int32)


def _check_rate(rate: float, name: str) -> None:
  # `not a <= x <= b` also rejects NaN.
  if not 0 <= rate <= 1:
    raise ValueError(f'{name}={rate!r} must be a probability in [0, 1].')
