"""`python -m launch train` end to end: the workdir contract, a falling loss, resume."""

import json
import pathlib
import struct
import sysconfig

import ml_collections
import numpy as np
import torch
import transformers
from tensorboardX.proto import event_pb2

import clm_jax
from clm_jax.eval import perplexity
from tests.helpers import cli


def _tb_tags(tb_dir):
  tags = set()
  for path in pathlib.Path(tb_dir).glob('events.out.tfevents.*'):
    data = path.read_bytes()
    i = 0
    while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc.
      (n,) = struct.unpack('<Q', data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      tags.update(v.tag for v in event.summary.value)
      i += 12 + n + 4
  return tags


def test_train_writes_the_workdir_contract_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  out = cli.train(workdir, tmp_path / 'cache', '--config.train.steps=40')
  assert 'step 40/40' in out.stdout

  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['d_model'] == 64 and config['train']['steps'] == 40
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_lines = [m for m in lines if 'loss' in m]
  assert [m['step'] for m in train_lines] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
  for m in train_lines[1:]:
    assert {'loss', 'lr', 'grad_norm', 'tokens_per_sec', 'step_time'} <= m.keys()
  # The loss falls: the last logged loss is well under the first.
  assert train_lines[-1]['loss'] < 0.8 * train_lines[0]['loss']
  evals = [m for m in lines if 'eval_loss' in m]
  assert evals and evals[-1]['step'] == 40 and evals[-1]['eval_loss'] < train_lines[0]['loss']
  assert {
    'train/loss',
    'train/lr',
    'train/grad_norm',
    'perf/tokens_per_sec',
    'perf/step_time',
    'eval/loss',
  } <= _tb_tags(workdir / 'tb')
  assert (
    sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    == ['10', '20', '30', '40'][-3:]
  )  # checkpoint.keep = 3
  assert (workdir / 'tokenizer.model').exists()

  # Running again with more steps resumes from step 40 and appends.
  out = cli.train(workdir, tmp_path / 'cache', '--config.train.steps=50')
  assert 'resuming from' in out.stderr
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [m['step'] for m in lines if 'loss' in m]
  assert steps == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
  assert (workdir / 'checkpoints' / '50').exists()


def test_tokenizer_train_then_data_prepare_then_train_on_it(tmp_path):
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  tree = tmp_path / 'tree'
  tree.mkdir()
  for path in sorted(stdlib.glob('*.py'))[:80]:
    (tree / path.name).write_bytes(path.read_bytes())
  for i in range(10):
    (tree / f'NOTES{i}.md').write_text(
      f'# Notes {i}\n\nModule group {i} of the standard library.\n'
    )
  cache = tmp_path / 'cache'
  tok = tmp_path / 'code.model'
  cli.launch(
    'tokenizer', 'train', f'--input={tree}', f'--output={tok}', '--vocab_size=512',
    '--sample_mb=1', cache=cache,
  )  # fmt: skip
  data = tmp_path / 'data'
  out = cli.launch(
    'data', 'prepare', f'--input={tree}', f'--output={data}', f'--tokenizer={tok}',
    '--workers=2', '--heldout_fraction=0.1', cache=cache,
  )  # fmt: skip
  assert 'Prepared' in out.stdout
  manifest = json.loads((data / 'manifest.json').read_text())
  assert set(manifest['languages']) == {'python', 'text'}
  assert manifest['splits']['heldout']

  workdir = tmp_path / 'run'
  cli.train(
    workdir,
    cache,
    '--config.train.steps=3',
    '--config.data.source=prepared',
    f'--config.data.path={data}',
    '--config.data.mixture=python:0.9,text:0.1',
    '--config.data.fim_rate=0.5',
  )
  assert (workdir / 'tokenizer.model').read_bytes() == tok.read_bytes()
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('eval_loss' in m for m in lines)

  out = cli.launch(
    'train', f'--workdir={tmp_path / "bad"}', f'--config.data.path={tmp_path / "nowhere"}',
    '--config.data.source=prepared', cache=cache, check=False,
  )  # fmt: skip
  assert out.returncode != 0
  assert 'error: data.path=' in out.stderr and 'data prepare' in out.stderr
  assert 'Traceback' not in out.stderr


def _lines(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_convert_to_and_from_hugging_face_then_generate_and_evaluate(tmp_path):
  """train -> convert --to_hf -> transformers -> convert --from_hf -> generate -> eval."""
  cache = tmp_path / 'cache'
  run = tmp_path / 'run'
  cli.train(
    run,
    cache,
    '--config.train.steps=3',
    '--config.train.code_eval_every=3',
    '--config.train.code_eval_tasks=humaneval,mbpp',
    '--config.train.code_eval_problems=2',
    '--config.train.code_eval_max_new_tokens=4',
  )
  # HumanEval and MBPP during training: logged, and their samples kept per step.
  for task in ('humaneval', 'mbpp'):
    assert [m[f'{task}_pass@1'] for m in _lines(run) if f'{task}_pass@1' in m] == [0.0]
    assert f'eval/{task}_pass_at_1' in _tb_tags(run / 'tb')
    samples = run / 'eval' / 'step_3' / task / f'{task}_samples.jsonl'
    assert len(samples.read_text().splitlines()) == 2
  hf_dir = tmp_path / 'hf'
  out = cli.launch(
    'convert', f'--to_hf={hf_dir}', f'--workdir={run}', '--dtype=float32', cache=cache
  )
  assert 'step 3' in out.stdout
  tokens = [[1, 5, 9, 200, 3, 77]]
  ours = clm_jax.load(run).logits(tokens)
  theirs = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    want = theirs(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)

  params = tmp_path / 'params'
  cli.launch('convert', f'--from_hf={hf_dir}', f'--output={params}', cache=cache)
  np.testing.assert_allclose(clm_jax.load(params).logits(tokens), ours, rtol=1e-6, atol=1e-6)

  prompt = 'def add(a, b):\n'
  out = cli.launch(
    'generate', f'--checkpoint={params}', f'--prompt={prompt}', '--max_new_tokens=8', cache=cache
  )
  model = clm_jax.load(run)
  ids = [model.tokenizer.bos_id, *model.tokenizer.encode(prompt)]
  new = model.generate([ids], max_new_tokens=8, stop_ids=(model.tokenizer.eos_id,))[0]
  assert out.stdout == model.tokenizer.decode(ids[1:] + new) + '\n'
  assert out.stdout.startswith(prompt) and len(new) > 0

  # Held-out perplexity: the same loss as training's own last evaluation.
  config = ml_collections.ConfigDict(json.loads((run / 'config.json').read_text()))
  want = [m for m in _lines(run) if 'eval_loss' in m][-1]['eval_loss']
  got = perplexity.heldout(model, config, max_batches=config.train.eval_batches)
  np.testing.assert_allclose(got['loss'], want, rtol=1e-5)
  assert got['batches'] == 2 and got['tokens'] > 0

  out = cli.launch(
    'eval', '--task=humaneval', f'--checkpoint={run}', '--problems=3', '--max_new_tokens=4',
    f'--output={tmp_path / "he"}', cache=cache,
  )  # fmt: skip
  records = [json.loads(line) for line in (tmp_path / 'he' / 'humaneval_samples.jsonl').open()]
  assert [r['task_id'] for r in records] == ['HumanEval/0', 'HumanEval/1', 'HumanEval/2']
  summary = json.loads((tmp_path / 'he' / 'summary.json').read_text())
  assert summary['pass@1'] == sum(r['passed'] for r in records) / 3 and summary['problems'] == 3

  out = cli.launch(
    'eval', '--task=mbpp', f'--checkpoint={run}', '--problems=2', '--max_new_tokens=4',
    f'--output={tmp_path / "mbpp"}', cache=cache,
  )  # fmt: skip
  records = [json.loads(line) for line in (tmp_path / 'mbpp' / 'mbpp_samples.jsonl').open()]
  assert [r['task_id'] for r in records] == [11, 12]
