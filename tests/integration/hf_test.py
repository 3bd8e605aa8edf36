"""Hugging Face interop: logits equal transformers' Llama both ways; memory ~ one tensor."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers

from tests.helpers import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
VOCAB = 416  # Room for the test tokenizer's 400 pieces.
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 24))


def _tiny_llama(directory, heads=8, kv_heads=2, theta=1e6, eps=1e-5, **save):
  """A random fp32 LlamaForCausalLM saved to `directory`; returns its logits of TOKENS."""
  torch.manual_seed(heads * 10 + kv_heads)
  cfg = transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    rope_theta=theta,
    rms_norm_eps=eps,
    max_position_embeddings=64,
    # Large enough weights that attention and rotary move the logits a lot:
    # a wrong head layout or theta gives errors near 1, not 1e-3.
    initializer_range=0.2,
    attn_implementation='eager',
  )
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:  # Not all ones: a misplaced norm must show.
        p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(directory, **save)
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """A GQA model's directory (with a tokenizer) and its transformers logits."""
  directory = tmp_path_factory.mktemp('llama')
  return directory, _tiny_llama(directory)


def _numpy_llama(directory, vocab, d_model, mlp_dim, layers, heads, **config):
  """A HF Llama directory written from NumPy (no torch): uniform random fp32."""
  rng = np.random.default_rng(0)
  shapes = {'model.embed_tokens.weight': (vocab, d_model), 'model.norm.weight': (d_model,)}
  shapes['lm_head.weight'] = (vocab, d_model)
  for i in range(layers):
    for name, shape in [
      ('self_attn.q_proj', (d_model, d_model)), ('self_attn.k_proj', (d_model, d_model)),
      ('self_attn.v_proj', (d_model, d_model)), ('self_attn.o_proj', (d_model, d_model)),
      ('mlp.gate_proj', (mlp_dim, d_model)), ('mlp.up_proj', (mlp_dim, d_model)),
      ('mlp.down_proj', (d_model, mlp_dim)), ('input_layernorm', (d_model,)),
      ('post_attention_layernorm', (d_model,)),
    ]:  # fmt: skip
      shapes[f'model.layers.{i}.{name}.weight'] = shape
  tensors = {name: rng.random(shape, dtype=np.float32) for name, shape in shapes.items()}
  safetensors.numpy.save_file(tensors, directory / 'model.safetensors', metadata={'format': 'pt'})
  hf_config = dict(
    model_type='llama', vocab_size=vocab, hidden_size=d_model, intermediate_size=mlp_dim,
    num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=128, **config,
  )  # fmt: skip
  (directory / 'config.json').write_text(json.dumps(hf_config))
  return max(x.nbytes for x in tensors.values())


_PEAK_SCRIPT = """
import json, sys
import jax, numpy as np
from clm_jax.ckpt import hf

def peak():
  status = open('/proc/self/status').read()
  return int(status.split('VmHWM:')[1].split()[0]) * 1024

jax.jit(lambda x: x + 1)(np.ones(3)).block_until_ready()  # The runtime, up.
out = {'baseline': peak()}
cfg, params = hf.load_hf(sys.argv[1], progress=False)
out['held'] = sum(x.nbytes for x in jax.tree.leaves(jax.block_until_ready(params)))
out['load'] = peak()
hf.save_hf(params, cfg, sys.argv[2], dtype='float32', progress=False)
out['save'] = peak()
print(json.dumps(out))
"""


def test_host_memory_stays_about_two_of_the_largest_tensor(tmp_path):
  # 2 x 128 MB embedding and head, 2 x 50 MB layers: 350 MB of fp32.
  largest = _numpy_llama(tmp_path, 32000, 1024, 2816, 2, 8)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # One plain CPU device.
  out = subprocess.run(
    [sys.executable, '-c', _PEAK_SCRIPT, str(tmp_path), str(tmp_path / 'out')],
    capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  m = json.loads(out.stdout.splitlines()[-1])
  # On CPU the params themselves live in host memory: what counts is the rest.
  assert m['load'] - m['baseline'] - m['held'] < 2 * largest + 2**26, m
  assert m['save'] - m['baseline'] - m['held'] < 2 * largest + 2**26, m
  with safetensors.safe_open(tmp_path / 'out' / 'model.safetensors', framework='numpy') as f:
    got = f.get_tensor('model.layers.1.mlp.down_proj.weight')
  with safetensors.safe_open(tmp_path / 'model.safetensors', framework='numpy') as f:
    np.testing.assert_array_equal(got, f.get_tensor('model.layers.1.mlp.down_proj.weight'))


def _huge_header(directory):
  path = directory / 'model.safetensors'
  path.write_bytes((2**62).to_bytes(8, 'little') + path.read_bytes()[8:])


def _no_heads(directory):
  config = json.loads((directory / 'config.json').read_text())
  (directory / 'config.json').write_text(json.dumps({**config, 'num_attention_heads': 0}))


@pytest.mark.parametrize(
  'break_it, file, match',
  [
    (_no_heads, 'config.json', 'num_attention_heads=0 must be a positive integer'),
    (_huge_header, 'model.safetensors', 'header too large'),
  ],
)
def test_convert_from_a_hostile_directory_is_one_error_line(tmp_path, break_it, file, match):
  model = tmp_path / 'model'
  model.mkdir()
  _numpy_llama(model, 32, 16, 32, 2, 4)
  break_it(model)
  out = cli.launch(
    'convert', '--config=configs/default.py', f'--from_hf={model}',
    f'--output={tmp_path / "out"}', cache=tmp_path, check=False,
  )  # fmt: skip
  assert out.returncode != 0 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {model / file}: ') and match in last, last
  assert not (tmp_path / 'out').exists()
