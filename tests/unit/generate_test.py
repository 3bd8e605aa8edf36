"""Generation against full recomputation, sampling statistics, and the infilling layout."""

import functools
import pathlib
import sysconfig
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clm_jax.data import fim
from clm_jax.data import tokenizer as tokenizer_lib
from clm_jax.inference import generate
from clm_jax.model import decoder as model_lib
from clm_jax.parallel import sharding
from tests.helpers import models

init = jax.jit(model_lib.init, static_argnums=0)
apply = jax.jit(model_lib.apply, static_argnums=0)
prefill = jax.jit(generate.prefill, static_argnums=(0, 4))
step = jax.jit(generate.step, static_argnums=0)

# Different lengths, so the batch is left-padded by 0, 4 and 6 slots.
PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 8], [1, 3, 40, 41], [1, 60]]
NEW = 6
# Every full-recompute check pads to this length, so `apply` compiles once.
FULL_LEN = len(PROMPTS[0]) + NEW


def _cfg(**overrides):
  return models.tiny_model_config(**overrides)


@functools.cache
def _params(cfg):
  """Random params, shared by the tests (which copy before changing them)."""
  return init(cfg, jax.random.key(0))


def _full_logits(cfg, params, rows, length=FULL_LEN):
  """Next-token logits [B, V] after each row, from the training forward.

  Rows are right-padded to `length` (a fixed shape: one compilation); causal
  attention keeps padding after a row's end from changing its logits, so
  each row is as if alone.
  """
  tokens = np.zeros((len(rows), length), np.int32)
  for b, row in enumerate(rows):
    tokens[b, : len(row)] = row
  positions = np.tile(np.arange(length, dtype=np.int32), (len(rows), 1))
  logits = apply(model_lib.abstract(cfg)[0], params, tokens, np.ones_like(tokens), positions)
  return np.asarray(logits)[np.arange(len(rows)), [len(row) - 1 for row in rows]]


def _naive_greedy(cfg, params, prompts):
  """NEW argmax tokens per row, recomputing the whole sequence every step."""
  seqs = [list(prompt) for prompt in prompts]
  for _ in range(NEW):
    for row, logits in zip(seqs, _full_logits(cfg, params, seqs), strict=True):
      row.append(int(logits.argmax()))
  return [row[len(prompt) :] for row, prompt in zip(seqs, prompts, strict=True)]


@pytest.mark.parametrize('kv_heads', [2, 1])
def test_cached_logits_equal_full_recompute(kv_heads):
  cfg = _cfg(num_kv_heads=kv_heads)
  params = _params(cfg)
  tokens_BP, pad_B = generate.pad_left(PROMPTS, 0, cfg.vocab_size)
  P = tokens_BP.shape[1]
  logits_BV, cache = prefill(cfg, params, tokens_BP, pad_B, P + NEW)
  assert cache.k_LBSKH.shape == (2, 3, P + NEW, kv_heads, cfg.head_dim)
  seqs = [list(row) for row in PROMPTS]
  for i in range(NEW):
    want = _full_logits(cfg, params, seqs)
    np.testing.assert_allclose(logits_BV, want, rtol=1e-5, atol=1e-5, err_msg=f'step {i}')
    token_B = np.asarray(logits_BV).argmax(-1).astype(np.int32)
    for row, token in zip(seqs, token_B, strict=True):
      row.append(int(token))
    logits_BV, cache = step(cfg, params, token_B, pad_B, cache, P + i)


@pytest.mark.parametrize('kv_heads', [2, 1])
def test_greedy_equals_naive_loop_row_by_row(kv_heads):
  cfg = _cfg(num_kv_heads=kv_heads)
  params = _params(cfg)
  want = _naive_greedy(cfg, params, PROMPTS)
  assert generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW) == want
  # Alone, the most padded row has no padding at all.
  assert generate.generate(cfg, params, PROMPTS[2:], max_new_tokens=NEW) == want[2:]


def test_stop_ids_and_lengths():
  cfg = _cfg()
  params = _params(cfg)
  full = generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW)
  stop = next(t for i, t in enumerate(full[0]) if i >= 2 and t not in full[0][:i])
  cut = [row[: row.index(stop)] if stop in row else row for row in full]
  assert 2 <= len(cut[0]) < NEW and max(len(row) for row in cut) == NEW  # Rows stop apart.
  assert generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, stop_ids=(stop,)) == cut
  assert generate.generate(cfg, params, PROMPTS, max_new_tokens=3) == [r[:3] for r in full]
  # max_len caps prompt + new tokens by the longest prompt (8 tokens).
  assert generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, max_len=11) == [
    r[:3] for r in full
  ]
  with pytest.raises(ValueError, match='No room'):
    generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, max_len=8)
  with pytest.raises(ValueError, match='outside the vocabulary'):
    generate.generate(cfg, params, [[1, 97]], max_new_tokens=1)


def test_filter_logits_keeps_top_k_and_nucleus():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda **kw: np.isfinite(generate.filter_logits(logits, **kw))[0].tolist()  # noqa: E731
  assert kept(top_k=3) == [False, True, True, True]
  # The mass before each sorted token is 0, 0.5, 0.8, 0.95.
  assert kept(top_p=0.75) == [False, True, False, True]
  assert kept(top_p=0.85) == [False, True, True, True]
  assert kept(top_p=1e-6) == [False, True, False, False]
  assert kept(top_k=2, top_p=0.4) == [False, True, False, False]


def test_filters_that_keep_one_token_equal_greedy():
  cfg = _cfg()
  params = _params(cfg)
  greedy = generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW)
  hot = dict(max_new_tokens=NEW, temperature=5.0, seed=1)
  assert generate.generate(cfg, params, PROMPTS, top_k=1, **hot) == greedy
  assert generate.generate(cfg, params, PROMPTS, top_p=1e-6, **hot) == greedy
  sampled = generate.generate(cfg, params, PROMPTS, **hot)
  assert sampled != greedy
  assert generate.generate(cfg, params, PROMPTS, **hot) == sampled
  assert generate.generate(cfg, params, PROMPTS, **{**hot, 'seed': 2}) != sampled


@pytest.mark.parametrize('top_k', [0, 5])
def test_first_sample_follows_tempered_softmax(top_k):
  cfg = _cfg()
  # A sharp head spreads the logits over several nats, so the temperature
  # and the filter change the distribution measurably.
  params = {**_params(cfg), 'lm_head': _params(cfg)['lm_head'] * 30}
  prompt, n, temperature = [1, 5, 7], 8192, 0.7
  logits = _full_logits(cfg, params, [prompt], len(prompt))[0]
  kept = np.ones_like(logits, bool) if not top_k else logits >= np.sort(logits)[-top_k]

  def softmax(t):
    p = np.exp((logits - logits.max()) / t) * kept
    return p / p.sum()

  [tokens] = np.array(
    generate.generate(
      cfg, params, [prompt] * n, max_new_tokens=1, temperature=temperature, top_k=top_k
    )
  ).T
  freq = np.bincount(tokens, minlength=cfg.vocab_size) / n
  want = softmax(temperature)
  assert np.all(freq[~kept] == 0)
  # Five standard errors per token, plus a few counts for the rarest tokens;
  # the untempered softmax is far off.
  assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 3 / n)
  assert np.abs(freq - want).sum() < 0.3 * np.abs(softmax(1.0) - want).sum()


def test_sharded_params_give_the_same_tokens():
  cfg = _cfg()
  params = _params(cfg)
  mesh = jax.make_mesh(
    (2, 2, 1),
    sharding.MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
    devices=jax.devices()[:4],
  )
  _, abstract, axes = model_lib.abstract(cfg)
  sharded = jax.device_put(params, sharding.param_shardings(axes, abstract, mesh))
  wq_spec = sharded['blocks']['attn']['wq'].sharding.spec
  assert wq_spec == jax.sharding.PartitionSpec(None, None, 'tensor', None)
  prompts = PROMPTS[:2]
  assert generate.generate(cfg, sharded, prompts, max_new_tokens=NEW) == generate.generate(
    cfg, params, prompts, max_new_tokens=NEW
  )


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  paths = sorted(pathlib.Path(sysconfig.get_paths()['stdlib']).glob('*.py'))[:5]
  texts = [p.read_text() for p in paths]
  return tokenizer_lib.train(texts, tmp_path_factory.mktemp('tok') / 't.model', 384)


def _cut_at(lo, hi, n, spm):
  """A generator whose 3 doubles make fim.permute cut at lo, hi in PSM or SPM."""
  draws = np.array([(lo + 0.5) / (n + 1), (hi + 0.5) / (n + 1), 0.0 if spm else 0.99])
  return types.SimpleNamespace(random=lambda size: draws[:size])


@pytest.mark.parametrize('spm', [False, True])
def test_infill_prompt_is_the_training_layout(tok, spm):
  prefix, middle, suffix = 'def area(r):\n    ', 'return 3.14 * r * r', '\n\nprint(area(2))\n'
  text = prefix + middle + suffix
  rng = _cut_at(len(prefix), len(prefix) + len(middle), len(text), spm)
  # The training pipeline wraps every document, FIM or not, in BOS ... EOS.
  trained = [tok.bos_id, *fim.permute(text, rng, tok, spm_rate=0.5).tolist()]
  prompt = generate.format_infill(tok, prefix, suffix, spm)
  assert trained == prompt + tok.encode_fragment(middle) + [tok.sentinels['eot']]
  s = tok.sentinels
  head = [tok.bos_id, s['prefix'], s['suffix']] if spm else [tok.bos_id, s['prefix']]
  assert prompt[: len(head)] == head
  assert prompt.count(s['middle']) == 1 and prompt.count(s['suffix']) == 1


def _bigram_params(cfg, chain):
  """Params under which greedy decoding follows `chain`: chain[i] -> chain[i + 1].

  Zero blocks add nothing to the residual, so the logits are
  norm(embed[last token]) @ lm_head: a bigram table, here with one-hot rows.
  """
  params = jax.tree.map(jnp.zeros_like, _params(cfg))
  params['final_norm']['scale'] = jnp.ones(cfg.d_model)
  embed = np.zeros((cfg.vocab_size, cfg.d_model), np.float32)
  head = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
  for i, (token, following) in enumerate(zip(chain, chain[1:], strict=False)):
    embed[token, i] = 1.0
    head[i, following] = 1.0
  params['embed'], params['lm_head'] = jnp.asarray(embed), jnp.asarray(head)
  return params


@pytest.mark.parametrize(('spm', 'end'), [(False, 'eot'), (True, 'eot'), (False, 'eos')])
def test_infill_returns_the_middle_up_to_eot(tok, spm, end):
  cfg = _cfg(vocab_size=tok.vocab_size)
  prefix, middle, suffix = 'def f(a, b):\n    ', 'return x', '\n'
  end_id = tok.sentinels['eot'] if end == 'eot' else tok.eos_id
  chain = [generate.format_infill(tok, prefix, suffix, spm)[-1], *tok.encode(middle), end_id]
  assert len(set(chain)) == len(chain)
  params = _bigram_params(cfg, chain)
  # Past the end token the model would go on to <unk> (a zero embedding).
  assert tok.decode(generate.generate(cfg, params, [chain[:1]], max_new_tokens=9)[0]) != middle
  got = generate.infill(cfg, params, tok, prefix, suffix, spm=spm, max_new_tokens=9)
  assert got == middle
