"""`python -m launch train` end to end: the workdir contract, a falling loss, resume."""

import json
import pathlib
import struct
import sysconfig

import cli
from tensorboardX.proto import event_pb2


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
