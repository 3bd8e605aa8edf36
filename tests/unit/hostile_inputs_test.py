"""Hostile inputs to `data prepare` and to raw-source training: nothing escapes, nothing hangs.

Each test is one attack that once worked: a path in a JSONL label, symlinks
out of the input tree, special files, symlink loops, a cut gzip stream, an
input with nothing in it. Reads that could hang or exhaust memory run in a
subprocess with a timeout and a memory limit, so a regression fails the test
instead of the test run.
"""

import gzip
import json
import os
import pathlib
import subprocess
import sys
import zlib

import pytest

from clm_jax.config import schema
from clm_jax.data import prepare
from clm_jax.data import records
from clm_jax.data import sources
from clm_jax.data import tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]

GOOD = 'def add(a, b):\n    """Adds two numbers."""\n    total = a + b\n    return total\n'
SECRET = 'SECRET_TOKEN = "hunter2"\nroot:x:0:0:root:/root:/bin/bash\n' * 4


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  c_data = schema.get_config().data
  c_data.tokenizer_sample_mb = 1
  return tokenizer.for_corpus(c_data, 512, cache_dir=tmp_path_factory.mktemp('tok'))


def _tree(tmp_path: pathlib.Path) -> pathlib.Path:
  """A source tree holding one good document, and a secret file beside (outside) it."""
  tree = tmp_path / 'tree'
  tree.mkdir()
  (tree / 'good.py').write_text(GOOD)
  (tmp_path / 'secret.py').write_text(SECRET)
  return tree


def _prepare(inputs, output, tok) -> dict:
  options = prepare.PrepareOptions(heldout_fraction=0, near_dup_threshold=0)
  return prepare.prepare([str(p) for p in inputs], output, tok.path, options, progress=False)


def _texts(output: pathlib.Path, manifest: dict, tok) -> list[str]:
  out = []
  for split in records.SPLITS:
    for shard in manifest['splits'][split]:
      for record in records.read_shard(output / shard['file']):
        out.append(tok.decode(records.decode(record, manifest['dtype'])[0]))
  return out


def _everything_under(path: pathlib.Path) -> set[pathlib.Path]:
  return {pathlib.Path(d, name) for d, dirs, files in os.walk(path) for name in dirs + files}


def test_a_traversal_language_label_stays_inside_the_output(tmp_path, tok):
  dump = tmp_path / 'dump.jsonl'
  rows = [
    {'content': GOOD, 'language': '../../../escaped'},
    {'content': GOOD.replace('add', 'plus'), 'language': 'Python'},
  ]
  dump.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  output = tmp_path / 'a' / 'b' / 'out'
  output.parent.mkdir(parents=True)
  before = _everything_under(tmp_path)
  manifest = _prepare([dump], output, tok)
  written = _everything_under(tmp_path) - before
  assert written and all(p.is_relative_to(output) for p in written), sorted(written)
  # An unknown label is kept as 'unknown', like an unknown extension.
  assert {k: v['documents'] for k, v in manifest['languages'].items()} == {
    'python': 1,
    'unknown': 1,
  }


def test_a_symlink_out_of_the_tree_is_counted_not_read(tmp_path, tok):
  tree = _tree(tmp_path)
  (tree / 'leak.py').symlink_to(tmp_path / 'secret.py')
  (tree / 'passwd.txt').symlink_to('/etc/passwd')
  manifest = _prepare([tree], tmp_path / 'out', tok)
  assert manifest['documents']['dropped'] == {'symlink_outside': 2}
  assert _texts(tmp_path / 'out', manifest, tok) == [GOOD]


def test_raw_source_training_lists_no_symlink(tmp_path):
  tree = _tree(tmp_path)
  (tree / 'leak.py').symlink_to(tmp_path / 'secret.py')
  (tree / 'alias.py').symlink_to(tree / 'good.py')  # Inside: would train on good.py twice.
  c_data = schema.get_config().data
  c_data.update(source='files', path=str(tree))
  assert sources.list_files(c_data) == [tree.resolve() / 'good.py']
  with pytest.raises(OSError, match='leak.py'):
    sources.read_text(tree / 'leak.py')


# Lists and reads `root` as `data prepare` and raw-source training do, under a
# memory limit of 1 GiB beyond what the imports took.
_ISOLATED = """
import json, resource, sys
from clm_jax.config import schema
from clm_jax.data import sources

status = open('/proc/self/status').read()
vm = int(status.split('VmSize:')[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))
options = sources.ReadOptions()
reasons = {}
for unit in sources.list_units([sys.argv[1]]):
  for item in sources.read_unit(unit, options):
    reason = getattr(item, 'reason', 'document')
    reasons[reason] = reasons.get(reason, 0) + 1
c_data = schema.get_config().data
c_data.update(source='files', path=sys.argv[1])
files = [p.name for p in sources.list_files(c_data)]
print(json.dumps({'reasons': reasons, 'files': files}))
"""


def _read_isolated(root: pathlib.Path) -> dict:
  try:
    out = subprocess.run(
      [sys.executable, '-c', _ISOLATED, str(root)],
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=60,
    )
  except subprocess.TimeoutExpired:
    pytest.fail(f'reading {root} hung')
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.splitlines()[-1])


def test_a_symlink_to_dev_zero_is_not_read(tmp_path):
  tree = _tree(tmp_path)
  (tree / 'zero.py').symlink_to('/dev/zero')
  got = _read_isolated(tree)
  assert got == {'reasons': {'document': 1, 'symlink_outside': 1}, 'files': ['good.py']}


def test_a_fifo_does_not_hang(tmp_path):
  tree = _tree(tmp_path)
  os.mkfifo(tree / 'pipe.py')
  got = _read_isolated(tree)
  assert got == {'reasons': {'document': 1, 'special_file': 1}, 'files': ['good.py']}


def test_directory_symlinks_and_loops_are_counted(tmp_path, tok):
  tree = _tree(tmp_path)
  (tree / 'sub').mkdir()
  (tree / 'sub' / 'mod.py').write_text(GOOD.replace('add', 'plus'))
  (tree / 'sub' / 'loop').symlink_to(tree)  # Back to an ancestor: endless if followed.
  (tree / 'a').symlink_to('b')  # a -> b -> a: resolves nowhere.
  (tree / 'b').symlink_to('a')
  (tree / 'alias').symlink_to(tree / 'sub')  # Its files are read under sub/.
  (tmp_path / 'elsewhere').mkdir()
  (tmp_path / 'elsewhere' / 'other.py').write_text(SECRET)
  (tree / 'out').symlink_to(tmp_path / 'elsewhere')
  manifest = _prepare([tree], tmp_path / 'out', tok)
  assert manifest['documents']['dropped'] == {
    'symlink_inside': 1,
    'symlink_loop': 3,
    'symlink_outside': 1,
  }
  assert manifest['documents']['read'] == 2 + 5
  assert sorted(_texts(tmp_path / 'out', manifest, tok)) == sorted(
    [GOOD, GOOD.replace('add', 'plus')]
  )


def test_a_truncated_gzip_keeps_what_it_can_and_names_the_file(tmp_path, tok):
  lines = [
    json.dumps({'content': f'def f{i}(x):\n    return x * {i} + {i * i}\n', 'language': 'Python'})
    for i in range(300)
  ]
  data = gzip.compress(''.join(line + '\n' for line in lines).encode())
  cut = data[: len(data) * 2 // 3]
  # Independently of the reader: the lines that decompress whole from the cut stream.
  whole = zlib.decompressobj(wbits=31).decompress(cut).count(b'\n')
  assert 0 < whole < len(lines)
  path = tmp_path / 'cut.jsonl.gz'
  path.write_bytes(cut)
  manifest = _prepare([path], tmp_path / 'out', tok)
  assert manifest['documents']['kept'] == whole
  assert manifest['documents']['dropped'] == {'truncated': 1}
  assert manifest['damaged_inputs'] == [{'source': f'{path}:{whole + 1}', 'reason': 'truncated'}]


def test_an_input_without_documents_is_an_error_naming_it(tmp_path, tok):
  tree = tmp_path / 'tree'
  tree.mkdir()
  (tree / 'logo.png').write_bytes(b'\x89PNG\r\n')
  (tree / 'blank.py').write_text('\n')
  with pytest.raises(records.DataError, match=f'{tree}.*no usable document'):
    _prepare([tree], tmp_path / 'out', tok)
  assert not (tmp_path / 'out').exists()  # No empty dataset, nor a work dir blocking a rerun.
  (tmp_path / 'empty').mkdir()
  with pytest.raises(records.DataError, match='empty.*no usable document'):
    _prepare([tmp_path / 'empty'], tmp_path / 'out', tok)


def test_a_manifest_naming_a_shard_outside_its_directory_is_refused(tmp_path, tok):
  tree = _tree(tmp_path)
  output = tmp_path / 'out'
  manifest = _prepare([tree], output, tok)
  shard = manifest['splits']['train'][0]
  (tmp_path / 'elsewhere.array_record').write_bytes((output / shard['file']).read_bytes())
  shard['file'] = '../elsewhere.array_record'
  (output / records.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(records.DataError, match=r'\.\./elsewhere\.array_record.*outside'):
    records.read_manifest(output)
