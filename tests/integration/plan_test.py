"""The planner against the real model, XLA's compiled step and hand-computed figures."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from clm_jax.plan import report as plan_report

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


# Small configs on meshes up to 8 devices: one device, long rows (attention-
# dominated), data x tensor, a 2 x 2 x 2 pipeline, a 4-stage pipeline with
# fewer micro-batches in flight than per step, a circular schedule, FSDP, the
# projections saved (alone and under a circular schedule), and no remat.
# Where saved activations dominate the cases run in float32: XLA:CPU keeps
# bfloat16 activations as float32 (it holds the same bytes for both), which
# GPUs do not, and the estimate counts what a GPU holds.
CASES = {
  'one_device': {},
  'long_rows': dict(train__seq_len=1024, train__global_batch_size=4),
  'data_tensor': dict(mesh__data=4, mesh__tensor=2, train__microbatches=2),
  'pipeline_2x2x2': dict(mesh__data=2, mesh__tensor=2, mesh__pipeline=2, train__microbatches=4),
  'pipeline_4': dict(
    mesh__data=2, mesh__pipeline=4, train__microbatches=8, mesh__pipeline_microbatches=4
  ),
  'circular': dict(mesh__pipeline=2, mesh__virtual_stages=2, train__microbatches=4),
  'fsdp': dict(mesh__data=8, mesh__fsdp=True),
  'save_dots': dict(model__remat='save_dots', mesh__tensor=2),
  'save_dots_circular_fp32': dict(
    model__remat='save_dots',
    model__dtype='float32',
    mesh__pipeline=2,
    mesh__virtual_stages=2,
    train__microbatches=4,
  ),
  'no_remat_fp32': dict(model__remat='none', model__dtype='float32'),
}


def _plan_cli(*args):
  done = subprocess.run(
    [sys.executable, '-m', 'launch', 'plan', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  return done.stdout


def test_codellama_34b_figures_of_the_original_run():
  p = json.loads(_plan_cli('--config=configs/codellama_34b.py', '--json', '--suggest=2'))
  text = plan_report.describe(p)  # What `plan` without --json prints.

  # Hand-computed: 6 FLOPs per matmul parameter (4 attention projections of
  # 64 + 64 + 8 + 8 heads x 128, 3 MLP matrices, the LM head) plus causal
  # attention (QK^T and PV, 2 x 2 FLOPs x 3 for backward, halved).
  D, L, F, V, T = 8192, 48, 22016, 32000, 8192
  matmul = L * (D * 128 * (64 + 64 + 8 + 8) + 3 * D * F) + D * V
  per_token = 6 * matmul + 6 * L * T * 64 * 128
  assert p['flops_per_token'] == per_token
  assert p['params'] == 33_743_970_304
  assert p['steps_for_tokens'] == math.ceil(500e9 / (4096 * 8192)) == 14_902
  six_weeks = 42 * 86400
  mfu_needed = 500e9 * per_token / (128 * 312e12 * six_weeks)
  assert p['target']['mfu'] == pytest.approx(mfu_needed)
  assert 0.75 < mfu_needed < 0.77
  assert p['target']['device_hours'] == 128 * 42 * 24 == 129_024
  assert p['claim']['gpu_hours'] == 1.2e6
  assert not p['fits'] and p['headroom_gib'] < 0  # GPipe over 64-row micro-batches.
  assert p['suggestions'] and all(s['memory_gib'] <= 72 for s in p['suggestions'])

  for figure in (
    '33,743,970,304',
    '14,902 steps',
    '76.0% MFU',
    '129,024 GPU-hours: the claim does NOT match',
    '1,200,000 GPU-hours',
    'DOES NOT FIT',
  ):
    assert figure in text, figure


def test_cli_json_parses_and_xla_cross_check_runs_in_its_own_process():
  out = _plan_cli(
    '--config=configs/default.py',
    '--config.mesh.data=2',
    '--config.mesh.tensor=2',
    '--config.model.remat=full',
    '--config.model.dtype=bfloat16',
    '--json',
    '--xla',
  )
  p = json.loads(out)
  assert p['devices'] == 4
  assert p['memory_gib']['total'] * 2**30 == pytest.approx(p['xla']['total'], rel=0.15)
