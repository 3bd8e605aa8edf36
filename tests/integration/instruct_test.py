"""Instruction tuning: loss masks through packing, and rounds started from pre-trained params."""

import json

import ml_collections
import numpy as np

import clm_jax
from clm_jax.data import chat
from clm_jax.data import loader
from clm_jax.model import decoder as model_lib
from clm_jax.train import step as step_lib
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


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _first_loss(workdir):
  return next(m['loss'] for m in _metrics(workdir) if 'loss' in m)


INSTRUCT = [
  '--config.data.source=instruct',
  f'--config.data.path={cli.ROOT / "data" / "instruct"}',
  '--config.optim.peak_lr=0.003',
  '--config.optim.warmup_steps=2',
]


def test_rounds_of_instruction_tuning_from_pre_trained_params(tmp_path):
  cache = tmp_path / 'cache'
  pretrained = tmp_path / 'pretrained'
  cli.train(pretrained, cache, '--config.train.steps=20')

  round1 = tmp_path / 'round1'
  out = cli.train(
    round1, cache, *INSTRUCT, '--config.train.steps=20', f'--config.train.init_from={pretrained}'
  )
  assert f'params from {pretrained}' in out.stderr
  losses = [m['loss'] for m in _metrics(round1) if 'loss' in m]
  assert losses[-1] < 0.8 * losses[0]  # Learns the answers.
  # Step 1's loss is the pre-trained model's on the first batch, answers only.
  config = ml_collections.ConfigDict(json.loads((round1 / 'config.json').read_text()))
  model = clm_jax.load(pretrained)
  batch = next(
    iter(
      loader.make_dataset(
        config.data,
        model.tokenizer,
        seq_len=config.train.seq_len,
        batch_size=config.train.global_batch_size,
        split='train',
        seed=config.train.seed,
      )
    )
  )
  graphdef, _, _ = model_lib.abstract(model.config)
  token_losses, weights = step_lib.token_losses(graphdef, model.params, batch)
  assert 0 < weights.sum() < (batch['segment_ids'] > 0).sum()  # Prompts do not count.
  np.testing.assert_allclose(losses[0], token_losses.sum() / weights.sum(), rtol=1e-4)

  # The same params through a Hugging Face directory give the same first step.
  hf_dir = tmp_path / 'hf'
  cli.launch(
    'convert', f'--to_hf={hf_dir}', f'--workdir={pretrained}', '--dtype=float32', cache=cache
  )
  from_hf = tmp_path / 'from_hf'
  cli.train(
    from_hf, cache, *INSTRUCT, '--config.train.steps=1', f'--config.train.init_from={hf_dir}'
  )
  np.testing.assert_allclose(_first_loss(from_hf), _first_loss(round1), rtol=1e-5)

  # Round 2 starts where round 1 ended.
  round2 = tmp_path / 'round2'
  cli.train(
    round2, cache, *INSTRUCT, '--config.train.steps=1', f'--config.train.init_from={round1}'
  )
  assert _first_loss(round2) < losses[0]
  np.testing.assert_allclose(_first_loss(round2), losses[-1], rtol=0.3)

  # A pre-trained model of another shape is refused by name.
  out = cli.train(
    tmp_path / 'bad', cache, *INSTRUCT, '--config.model.mlp_dim=96',
    f'--config.train.init_from={pretrained}', check=False,
  )  # fmt: skip
  assert out.returncode != 0 and 'params/blocks/mlp/w_down has shape' in out.stderr
  out = cli.train(
    tmp_path / 'bad2', cache, *INSTRUCT, f'--config.train.init_from={tmp_path / "nowhere"}',
    check=False,
  )  # fmt: skip
  assert out.returncode != 0 and 'error: train.init_from=' in out.stderr
  assert 'Traceback' not in out.stderr

  # generate --chat formats the turn with the template and prints the answer.
  question = 'Write a function that reverses a string.'
  out = cli.launch(
    'generate', f'--checkpoint={round1}', '--chat', f'--prompt={question}', '--max_new_tokens=6',
    cache=cache,
  )  # fmt: skip
  tuned = clm_jax.load(round1)
  ids = chat.prompt_tokens([{'role': 'user', 'content': question}], tuned.tokenizer)
  assert ids[-1] != tuned.tokenizer.eos_id
  new = tuned.generate([ids], max_new_tokens=6, stop_ids=(tuned.tokenizer.eos_id,))[0]
  assert out.stdout == tuned.tokenizer.decode(new).strip() + '\n'
