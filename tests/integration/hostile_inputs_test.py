"""`data prepare` on inputs with no usable document: one error line, nothing written."""

import pathlib

from clm_jax.data import sources
from clm_jax.data import tokenizer
from tests.helpers import cli


def test_data_prepare_of_nothing_usable_is_one_error_line(tmp_path):
  code = sorted(pathlib.Path(sources.__file__).parent.glob('*.py'))
  tok = tokenizer.train([sources.read_text(p) for p in code], tmp_path / 'tok.model', 512)
  tree = tmp_path / 'tree'
  tree.mkdir()
  (tree / 'logo.png').write_bytes(b'\x89PNG\r\n')
  (tmp_path / 'secret.py').write_text('TOKEN = "hunter2"\n')
  (tree / 'leak.py').symlink_to(tmp_path / 'secret.py')
  out = cli.launch(
    'data', 'prepare', f'--input={tree}', f'--output={tmp_path / "out"}',
    f'--tokenizer={tok.path}', '--workers=1', cache=tmp_path / 'cache', check=False,
  )  # fmt: skip
  assert out.returncode != 0 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith(f'error: --input={tree}: no usable document (2 inputs read'), lines
  assert any(line.startswith('warning:') and "'symlink_outside': 1" in line for line in lines), (
    lines
  )
  assert not (tmp_path / 'out').exists()
