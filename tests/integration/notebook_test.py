"""notebooks/inspect_params.ipynb, executed on a tiny run: its numbers are the model's."""

import os
import re

import jax
import jupyter_client
import nbclient
import nbformat
import numpy as np
from ipykernel import kernelspec

import clm_jax
from clm_jax.config import schema
from clm_jax.model import decoder as model_lib
from clm_jax.parallel import sharding
from tests.helpers import cli

NOTEBOOK = cli.ROOT / 'notebooks' / 'inspect_params.ipynb'


def _run(notebook, tmp_path, env):
  """Executes the notebook in a kernel of this interpreter, started in notebooks/ as Jupyter does."""
  # A kernel spec of our own: a python3 spec installed elsewhere may name another interpreter.
  kernelspec.write_kernel_spec(tmp_path / 'kernels' / 'this-python')
  km = jupyter_client.KernelManager(
    kernel_name='this-python',
    kernel_spec_manager=jupyter_client.kernelspec.KernelSpecManager(
      kernel_dirs=[str(tmp_path / 'kernels')]
    ),
  )
  client = nbclient.NotebookClient(
    notebook,
    km=km,
    timeout=300,
    startup_timeout=120,
    resources={'metadata': {'path': str(NOTEBOOK.parent)}},
  )
  client.execute(env=env)
  return {cell.id: cell.outputs for cell in notebook.cells if cell.cell_type == 'code'}


def _stdout(outputs) -> str:
  return ''.join(o.text for o in outputs if o.output_type == 'stream' and o.name == 'stdout')


def _plain(outputs) -> str:
  return ''.join(o.data.get('text/plain', '') for o in outputs if o.output_type == 'display_data')


def _int(text: str) -> int:
  return int(text.replace(',', ''))


def test_inspect_params_prints_the_loaded_models_numbers(tmp_path):
  run = tmp_path / 'run'
  cli.train(run, tmp_path / 'cache', '--config.train.steps=2')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # The committed notebook carries no outputs (they would be stale and large).
  assert not any(cell.get('outputs') for cell in notebook.cells)
  outputs = _run(notebook, tmp_path, {**os.environ, 'CLM_JAX_CHECKPOINT': str(run)})

  # The same load in this process (8 CPU devices from conftest), on the notebook's mesh.
  c_mesh = schema.get_config().mesh
  c_mesh.update(data=-1, tensor=2, pipeline=2)
  mesh = sharding.make_mesh(c_mesh)
  model = clm_jax.load(run, mesh=mesh)
  assert "mesh: {'data': 2, 'tensor': 2, 'pipeline': 2}" in _stdout(outputs['load'])

  # One table row per parameter, its spec the rules table's for its logical axes.
  _, abstract, axes = model_lib.abstract(model.config)
  leaves = jax.tree_util.tree_leaves_with_path(model.params)
  lines = _stdout(outputs['table']).splitlines()
  assert re.split(r'\s{2,}', lines[0]) == [
    'parameter',
    'shape',
    'dtype',
    'sharding',
    'bytes',
    'per device',
    'copies',
  ]
  table = {row[0]: row[1:] for row in (re.split(r'\s{2,}', line.strip()) for line in lines[1:])}
  assert len(table) == len(leaves)
  for path, x in leaves:
    keys = [key.key for key in path]
    spec = sharding.logical_to_spec(_at(axes, keys), x.shape, mesh.shape)
    shape, dtype, printed_spec, size, per_device, copies = table['.'.join(keys)]
    assert (shape, dtype, printed_spec) == (str(x.shape), 'float32', str(spec))
    assert _int(size) == x.size * 4
    assert _int(per_device) == x.addressable_shards[0].data.nbytes
    assert float(copies) == mesh.size * _int(per_device) / _int(size)
  # The rules table by name: vocabulary rows over 'tensor'; layers over 'pipeline', MLP over
  # 'tensor', so a quarter of the gate per device and each block on both 'data' replicas.
  assert table['embed'][2] == "P('tensor', None)"
  assert table['blocks.mlp.w_gate'][2:] == [
    "P('pipeline', None, 'tensor')",
    '65,536',
    '16,384',
    '2',
  ]

  # Totals: the parameter count, one copy's bytes, and each device's bytes from its shards.
  text = _stdout(outputs['totals'])
  count = model_lib.param_count(model.params)
  assert re.search(r'^parameters: ([\d,]+) in (\d+) arrays$', text, re.M).groups() == (
    f'{count:,}',
    str(len(leaves)),
  )
  total = _int(re.search(r'^bytes: ([\d,]+) ', text, re.M)[1])
  assert total == 4 * count
  want = {d.id: 0 for d in jax.devices()}
  for x in jax.tree.leaves(model.params):
    for shard in x.addressable_shards:
      want[shard.device.id] += shard.data.nbytes
  got = {
    int(d): _int(b) for d, b in re.findall(r'^device (\d+) at .*: ([\d,]+) bytes$', text, re.M)
  }
  assert got == want
  # All devices together hold each parameter's bytes times its copies; every device one shard
  # of each parameter, so the same bytes.
  on_devices = _int(re.search(r'^bytes on all devices: ([\d,]+) ', text, re.M)[1])
  assert on_devices == sum(got.values())
  assert on_devices == sum(_int(row[3]) * float(row[5]) for row in table.values())
  assert on_devices == mesh.size * sum(_int(row[4]) for row in table.values())
  assert total * 2 <= on_devices < total * mesh.size  # Copied over 'data', some of it split.
  assert f'balanced: every device holds {want[0]:,} bytes' in text

  # The sharding pictures name the devices of each block: embed rows over 'tensor'.
  pictures = _plain(outputs['visualize'])
  tensor_groups = {
    ','.join(str(i) for i in sorted(d.id for d in np.take(mesh.devices, t, axis=1).flat))
    for t in range(2)
  }
  assert all(f'CPU {group}' in pictures for group in tensor_groups), pictures
  assert 'float32(512, 64)' in _stdout(outputs['treescope-text'])
  assert any('text/html' in o.get('data', {}) for o in outputs['treescope-show'])

  # The top-5 next tokens and the greedy generation are this process's.
  tok = model.tokenizer
  prompt = [tok.bos_id, *tok.encode('def fibonacci(n):\n')]
  text = _stdout(outputs['logits'])
  assert f'= {prompt}' in text
  logits = model.logits([prompt])[0, -1]
  top5 = [int(t) for t in re.findall(r'^\s+(\d+)\s+p=', text, re.M)]
  assert top5 == np.argsort(-logits)[:5].tolist()
  [new_ids] = model.generate([prompt], max_new_tokens=24, stop_ids=[tok.eos_id], pad_id=tok.pad_id)
  text = _stdout(outputs['generate'])
  assert f'new tokens: {new_ids}\n' in text
  assert f'text: {tok.decode(new_ids)!r}\n' in text


def _at(tree, keys):
  for key in keys:
    tree = tree[key]
  return tree
