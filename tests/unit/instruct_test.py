"""Instruction tuning: loss masks through packing, and rounds started from pre-trained params."""

import json

import numpy as np
import pytest

from clm_jax.config import schema
from clm_jax.data import loader
from clm_jax.data import tokenizer
from clm_jax.model import loss as loss_lib
from tests.helpers import cli

DIALOGS = [
  {
    'prompt': 'Write a function that adds two numbers.',
    'completion': 'def add(a, b):\n  return a + b',
  },
  {
    'messages': [
      {'role': 'system', 'content': 'Answer with code only.'},
      {'role': 'user', 'content': 'Reverse a list.'},
      {'role': 'assistant', 'content': 'xs[::-1]'},
      {'role': 'user', 'content': 'And a string?'},
      {'role': 'assistant', 'content': 's[::-1]  # strings slice the same way'},
    ]
  },
  {'prompt': 'Name the empty tuple.', 'completion': '()'},
]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  text = '\n'.join(json.dumps(d) for d in DIALOGS) * 20
  return tokenizer.train([text, 'def f(x):\n  return x\n' * 50], path, 400)


def _answers(dialog):
  if 'completion' in dialog:
    return [dialog['completion']]
  return [m['content'] for m in dialog['messages'] if m['role'] == 'assistant']


def test_the_loss_mask_covers_exactly_the_answers_after_packing(tok, tmp_path):
  path = tmp_path / 'train.jsonl'
  path.write_text(''.join(json.dumps(d) + '\n' for d in DIALOGS * 3))
  c_data = schema.get_config().data
  c_data.update(source='instruct', path=str(path), streams=1)
  # Rows shorter than a dialog: answers and masks continue across row breaks.
  ds = loader.make_dataset(
    c_data, tok, seq_len=24, batch_size=1, split='train', seed=0, repeat=False
  )
  rows = list(ds)
  tokens = np.concatenate([r['tokens'][0] for r in rows])
  mask = np.concatenate([r['loss_mask'][0] for r in rows])
  segments = np.concatenate([r['segment_ids'][0] for r in rows])
  assert not mask[segments == 0].any()  # Never on padding.
  # The masked runs are the answers, each closed by its turn's EOS (the split
  # is shuffled, so in some order).
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  runs = [tokens[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]
  assert all(run[-1] == tok.eos_id for run in runs)
  assert sorted(tok.decode(run[:-1].tolist()).strip() for run in runs) == sorted(
    a for d in DIALOGS * 3 for a in _answers(d)
  )
  # Mask-free tokens include every prompt and the template.
  assert '[INST]' in tok.decode(tokens[mask == 0].tolist())


def test_targets_weigh_only_masked_next_tokens():
  tokens = np.array([[1, 5, 6, 7, 8, 2]])
  segments = np.ones_like(tokens)
  mask = np.array([[0, 0, 0, 1, 1, 1]])
  _, weights = loss_lib.targets(tokens, segments, mask)
  # Position t predicts token t + 1: the weights are the mask moved left by one.
  np.testing.assert_array_equal(weights, [[0, 0, 1, 1, 1, 0]])


INSTRUCT = [
  '--config.data.source=instruct',
  f'--config.data.path={cli.ROOT / "data" / "instruct"}',
  '--config.optim.peak_lr=0.003',
  '--config.optim.warmup_steps=2',
]
