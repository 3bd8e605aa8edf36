"""Bad command lines: one `error:` line naming the key, file or flag; no traceback, no run.

Each case runs `python -m launch` as a user would. The errors come before JAX starts,
so nothing here trains; the TINY flags only bound a run that should not happen.
"""

import pathlib
import sysconfig

import pytest

from clm_jax.data import tokenizer
from tests.helpers import cli


def _fails(*args, cache) -> str:
  """The one line of stderr of a failed `python -m launch *args`."""
  out = cli.launch(*args, cache=cache, check=False)
  assert out.returncode != 0, out.stdout[-2000:]
  assert 'Traceback' not in out.stderr, out.stderr[-4000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr[-4000:]
  return lines[0]


def _train(tmp_path, *flags) -> str:
  workdir = tmp_path / 'run'
  line = _fails(
    'train', *cli.TINY, '--config.train.steps=1', f'--workdir={workdir}', *flags,
    cache=tmp_path / 'cache',
  )  # fmt: skip
  assert not (workdir / 'config.json').exists()  # The run never started.
  return line


@pytest.mark.parametrize(
  'override, key, closest',
  [
    ('--config.train.stepz=3', 'train.stepz', 'train.steps'),
    ('--config.trian.steps=3', 'trian.steps', 'train.steps'),
    ('--config.model.num_layer=3', 'model.num_layer', 'model.num_layers'),
    ('--noconfig.mesh.fsbp', 'mesh.fsbp', 'mesh.fsdp'),
  ],
)
def test_unknown_config_key_names_it_and_the_closest(tmp_path, override, key, closest):
  line = _train(tmp_path, override)
  assert line == f'error: --config.{key}: unknown config key (did you mean {closest}?)'


@pytest.mark.parametrize(
  'text, problem',
  [
    (None, 'no such file'),
    ('def get_config(:\n  pass\n', 'SyntaxError'),
    ('def get_config():\n  return {"model": {}}\n', 'returned dict, not an ml_collections'),
    ('def get_config():\n  return undefined_name\n', "(line 2): NameError: name 'undefined"),
  ],
)
def test_a_broken_config_file_is_named(tmp_path, text, problem):
  path = tmp_path / 'my_config.py'
  if text is not None:
    path.write_text(text)
  line = _fails('train', f'--config={path}', f'--workdir={tmp_path}', cache=tmp_path / 'cache')
  assert line.startswith(f'error: --config={path}') and problem in line


def test_workdir_under_a_regular_file(tmp_path):
  (tmp_path / 'file').write_text('x')
  line = _fails('train', f'--workdir={tmp_path / "file" / "run"}', cache=tmp_path / 'cache')
  assert (
    line == f'error: --workdir={tmp_path / "file" / "run"}: {tmp_path / "file"} is not a directory'
  )


def test_checkpoints_is_a_file(tmp_path):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'checkpoints').write_text('x')
  line = _train(tmp_path)
  assert f'{tmp_path / "run" / "checkpoints"} is not a directory' in line


@pytest.fixture(scope='module')
def tok(tmp_path_factory) -> pathlib.Path:
  """A 400-piece tokenizer (0.1 s to train)."""
  stdlib = sorted(pathlib.Path(sysconfig.get_paths()['stdlib']).glob('*.py'))[:5]
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  assert tokenizer.train([p.read_text() for p in stdlib], path, 400).vocab_size == 400
  return path


def test_model_vocab_smaller_than_the_tokenizer(tmp_path, tok):
  line = _train(tmp_path, f'--config.data.tokenizer={tok}', '--config.model.vocab_size=384')
  assert f'tokenizer {tok} has 400 pieces but model.vocab_size=384' in line


def test_junk_tokenizer_file(tmp_path):
  junk = tmp_path / 'junk.model'
  junk.write_text('not a model\n')
  line = _train(tmp_path, f'--config.data.tokenizer={junk}')
  assert line.startswith(f'error: data.tokenizer: {junk} is not a valid sentencepiece model')


def test_data_prepare_output_is_a_file(tmp_path, tok):
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'a.py').write_text('print(1)\n')
  (tmp_path / 'out').write_text('x')
  line = _fails(
    'data', 'prepare', f'--input={tmp_path / "in"}', f'--output={tmp_path / "out"}',
    f'--tokenizer={tok}', cache=tmp_path / 'cache',
  )  # fmt: skip
  assert line == f'error: --output={tmp_path / "out"}: {tmp_path / "out"} is not a directory'


@pytest.mark.parametrize(
  'command, flag, takers',
  [
    ('train', '--prompt=x', 'generate, eval'),
    ('plan', '--spawn=2', 'train, slurm'),
    ('generate', '--to_hf=x', 'convert'),
  ],
)
def test_a_flag_of_another_command_is_rejected(tmp_path, command, flag, takers):
  args = [command, flag] if command != 'train' else ['train', *cli.TINY, flag]
  line = _fails(*args, f'--workdir={tmp_path / "run"}', cache=tmp_path / 'cache')
  name = flag.split('=')[0]
  assert line.startswith(f'error: {command} does not take {name} ({takers} do)')
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'command, listed, absent',
  [
    (['train'], ['--spawn', '--coordinator_address', '--config', '--workdir'], ['--prompt']),
    (['generate'], ['--prompt', '--checkpoint', '--max_new_tokens'], ['--to_hf', '--spawn']),
    (['data', 'prepare'], ['--near_dup_threshold', '--input'], ['--nodes', '--prompt']),
  ],
)
def test_help_lists_the_command_s_flags_only(tmp_path, command, listed, absent):
  out = cli.launch(*command, '--help', cache=tmp_path / 'cache')
  assert out.stdout.startswith(f'usage: python -m launch {" ".join(command)} [flags]')
  flags = {line.split(':')[0].strip().replace('[no]', '') for line in out.stdout.splitlines()}
  assert set(listed) <= flags and not set(absent) & flags, out.stdout
