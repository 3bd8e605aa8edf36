"""Fill-in-the-middle (FIM) as CodeLlama trains it, after Bavarian et al. 2022.

A document is cut at two uniform character positions into prefix, middle and
suffix, and laid out as

  PSM: <PRE> enc(prefix) <SUF> frag(suffix) <MID> frag(middle) <EOT>
  SPM: <PRE> <SUF> frag(suffix) <MID> enc(prefix + middle) <EOT>

where enc is `Tokenizer.encode` and frag is `Tokenizer.encode_fragment`, which
leaves out the dummy ' ' LLaMA-style tokenizers add (CodeLlama paper, section
2.3; its `infilling_prompt_tokens` lays out the prompt the same way). SPM
encodes prefix and middle as one text, so no token is split at their boundary.
`infill_prompt` is this layout up to <MID>, as generation feeds it.

Every call draws a fixed number of doubles (`random`, never the
rejection-sampling `integers`), so later randomness does not depend on earlier
documents. The caller adds BOS/EOS.
"""

import math

import numpy as np

from clm_jax.data import tokenizer as tokenizer_lib

# Doubles permute() draws: two cut positions, then PSM vs SPM.
_PERMUTE_DRAWS = 3


def check_tokenizer(tokenizer: tokenizer_lib.Tokenizer) -> None:
  """Raises ValueError naming the infilling sentinels `tokenizer` lacks, if any."""
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
  """Always applies FIM to one document, drawing exactly 3 doubles from `rng`.

  Returns int32 ids in PSM or SPM layout, without BOS or EOS; an empty text
  gives the four sentinels around empty parts.
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
  """Applies FIM to a document's ids (no BOS or EOS) with probability `fim_rate`.

  Always draws 4 doubles: the decision, then permute()'s 3. Sentinels are
  checked whenever fim_rate > 0, so a bad tokenizer fails on the first document,
  not the first one drawn for FIM. An empty document is returned unchanged.
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  permuted = draw(tokens, rng, tokenizer, fim_rate=fim_rate, spm_rate=spm_rate)
  return tokens if permuted is None else permuted


def draw(
  tokens: np.ndarray,
  rng: np.random.Generator,
  tokenizer: tokenizer_lib.Tokenizer,
  *,
  fim_rate: float,
  spm_rate: float = 0.5,
) -> np.ndarray | None:
  """The FIM layout of a document's ids with probability `fim_rate`, else None.

  As `maybe_permute`, but says whether it transformed the document, so the
  loader can still choose the document as it was (see loader.make_dataset).
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
    return None
  return _arrange(tokenizer.decode(tokens), draws[1:], tokenizer, spm_rate)


def layout(
  tokenizer: tokenizer_lib.Tokenizer, prefix: str, middle: str, suffix: str, *, spm: bool
) -> list[int]:
  """The ids of one FIM example in PSM or SPM (module docstring), ending in <EOT>."""
  check_tokenizer(tokenizer)
  s = tokenizer.sentinels
  suffix_ids = tokenizer.encode_fragment(suffix)
  if spm:
    return [
      s['prefix'],
      s['suffix'],
      *suffix_ids,
      s['middle'],
      *tokenizer.encode(prefix + middle),
      s['eot'],
    ]
  return [
    s['prefix'],
    *tokenizer.encode(prefix),
    s['suffix'],
    *suffix_ids,
    s['middle'],
    *tokenizer.encode_fragment(middle),
    s['eot'],
  ]


def infill_prompt(
  tokenizer: tokenizer_lib.Tokenizer, prefix: str, suffix: str, *, spm: bool
) -> list[int]:
  """The ids a model trained on `layout` continues with the middle, then <EOT>.

  The layout of an empty middle up to <MID> (PSM) or up to the prefix (SPM),
  without BOS: CodeLlama's `infilling_prompt_tokens`.
  """
  # An empty middle encodes to no ids in either layout, so the prompt is the
  # example less its closing <EOT>.
  return layout(tokenizer, prefix, '', suffix, spm=spm)[:-1]


def restore(ids: np.ndarray, tokenizer: tokenizer_lib.Tokenizer) -> str:
  """Returns the document a FIM sequence came from: prefix + middle + suffix.

  Ids without sentinels are just decoded; ids holding sentinels in another
  layout than permute()'s raise ValueError. A PSM with an empty prefix starts
  <PRE> <SUF> as an SPM does and is read as one. That is exact for tokenizers
  without a dummy prefix; with one, a middle that then starts with ' ' reads
  back without it, for its ids are those of the SPM of the text without it.
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
  suffix = tokenizer.decode_fragment(ids[suf + 1 : mid])
  after_mid = ids[mid + 1 : eot]
  if suf == pre + 1:  # SPM: after <MID> comes the encoded prefix + middle.
    return tokenizer.decode(after_mid) + suffix
  prefix = tokenizer.decode(ids[pre + 1 : suf])
  return prefix + tokenizer.decode_fragment(after_mid) + suffix


def _arrange(
  text: str, draws: np.ndarray, tokenizer: tokenizer_lib.Tokenizer, spm_rate: float
) -> np.ndarray:
  """Cuts `text` where draws[0:2] say and lays it out as draws[2] says."""
  n = len(text)
  # floor(u * (n + 1)) is uniform over the n + 1 cut points [0, n]; min()
  # guards the rounding of u * (n + 1) up to n + 1 for u just below 1.
  lo, hi = sorted(min(math.floor(u * (n + 1)), n) for u in draws[:2])
  ids = layout(tokenizer, text[:lo], text[lo:hi], text[hi:], spm=bool(draws[2] < spm_rate))
  return np.array(ids, dtype=np.int32)


def _check_rate(rate: float, name: str) -> None:
  # `not a <= x <= b` also rejects NaN.
  if not 0 <= rate <= 1:
    raise ValueError(f'{name}={rate!r} must be a probability in [0, 1].')
