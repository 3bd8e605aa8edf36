"""Hugging Face interop: logits equal transformers' Llama both ways; memory ~ one tensor."""

import functools
import json
import operator
import pathlib
import types

import grain
import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import clm_jax
from clm_jax import config as config_lib
from clm_jax.ckpt import checkpoint
from clm_jax.ckpt import hf
from clm_jax.ckpt import params as params_lib
from clm_jax.data import tokenizer
from clm_jax.inference import loaded
from clm_jax.model import decoder as model_lib
from clm_jax.parallel import sharding

ROOT = pathlib.Path(__file__).resolve().parents[2]
VOCAB = 416  # Room for the test tokenizer's 400 pieces.
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 24))


def _rel(got, want) -> float:
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


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


def _transformers_logits(directory) -> np.ndarray:
  model = transformers.LlamaForCausalLM.from_pretrained(
    directory, dtype=torch.float32, attn_implementation='eager'
  ).eval()
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """A GQA model's directory (with a tokenizer) and its transformers logits."""
  directory = tmp_path_factory.mktemp('llama')
  return directory, _tiny_llama(directory)


@pytest.fixture(scope='module')
def tok_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  # The json package's source: ASCII code, few enough characters for 400 pieces.
  text = ''.join(p.read_text() for p in sorted(pathlib.Path(json.__file__).parent.glob('*.py')))
  tokenizer.train([text], path, 400)
  return path


@pytest.mark.parametrize(
  'heads, kv_heads, theta, eps',
  [(4, 4, 1e4, 1e-6), (8, 2, 1e6, 1e-5), (4, 1, 5e5, 1e-5)],
  ids=['mha', 'gqa', 'multi_query'],
)
def test_logits_equal_transformers(tmp_path, heads, kv_heads, theta, eps):
  want = _tiny_llama(tmp_path, heads, kv_heads, theta, eps)
  model = clm_jax.load(tmp_path)
  c = model.config
  assert (c.num_heads, c.num_kv_heads, c.rope_theta, c.norm_eps) == (heads, kv_heads, theta, eps)
  assert (c.param_dtype, c.dtype, model.tokenizer) == ('float32', 'float32', None)
  assert _rel(model.logits(TOKENS), want) < 1e-4
  assert _rel(model.logits(TOKENS.tolist())[:1], want[:1]) < 1e-4


def test_sharded_index_directory_loads_the_same(tmp_path):
  want = _tiny_llama(tmp_path, max_shard_size='60KB')
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  assert len(set(index['weight_map'].values())) > 2
  assert _rel(clm_jax.load(tmp_path).logits(TOKENS), want) < 1e-4


def _write_config(directory, **changes):
  path = pathlib.Path(directory) / 'config.json'
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps({k: v for k, v in config.items() if v != 'drop'}))


def test_rope_theta_from_transformers_4_and_5_configs(llama, tmp_path):
  (tmp_path / 'config.json').write_text((llama[0] / 'config.json').read_text())
  _write_config(tmp_path, rope_parameters='drop', rope_theta=5e5, rope_scaling=None)
  assert hf.read_hf_config(tmp_path)['rope_theta'] == 5e5
  _write_config(
    tmp_path, rope_theta='drop', rope_parameters={'rope_theta': 2e5, 'rope_type': 'default'}
  )
  assert hf.read_hf_config(tmp_path)['rope_theta'] == 2e5
  _write_config(tmp_path, rope_parameters='drop')
  assert hf.read_hf_config(tmp_path)['rope_theta'] == 1e4  # LlamaConfig's default


def _our_model(seed=0):
  """A tiny clm_jax model's config and params, norm scales random too."""
  cfg = config_lib.ModelConfig(
    vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=8, num_kv_heads=2, mlp_dim=96,
    rope_theta=1e6, max_seq_len=64, init_std=0.2, dtype='float32', remat='none',
  )  # fmt: skip
  params = jax.jit(model_lib.init, static_argnums=0)(cfg, jax.random.key(seed))
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: (
      x + 0.3 * jax.random.normal(jax.random.key(1), x.shape)
      if 'scale' in jax.tree_util.keystr(p)
      else x
    ),
    params,
  )
  return cfg, params


def _our_logits(cfg, params) -> np.ndarray:
  graphdef, _, _ = model_lib.abstract(cfg)
  ones = np.ones_like(TOKENS)
  return np.asarray(model_lib.apply(graphdef, params, TOKENS, ones, np.cumsum(ones, 1) - 1))


def test_export_equals_transformers_and_reads_back_exactly(tmp_path, tok_path):
  cfg, params = _our_model()
  out = hf.save_hf(params, cfg, tmp_path, tok_path, dtype='float32', max_shard_bytes=2**17)
  assert len(out['files']) > 2 and (tmp_path / hf.INDEX_FILE).is_file()
  want = _our_logits(cfg, params)
  assert _rel(_transformers_logits(tmp_path), want) < 1e-4

  # Its tokenizer is ours, as HF's LlamaTokenizer reads it.
  ours = tokenizer.load(tok_path)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  text = 'def f(x):\n\t  return  x + 1  # café 😀\n\n'
  assert theirs(text)['input_ids'] == [ours.bos_id, *ours.encode(text)]
  assert theirs.decode(theirs(text)['input_ids'], skip_special_tokens=True) == text

  model = clm_jax.load(tmp_path)
  assert model.tokenizer.vocab_size == 400
  jax.tree.map(np.testing.assert_array_equal, model.params, params)


def test_export_is_bfloat16_by_default(tmp_path):
  cfg, params = _our_model()
  hf.save_hf(params, cfg, tmp_path, progress=False)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['torch_dtype'] == config['dtype'] == 'bfloat16'
  assert config['rope_parameters']['rope_theta'] == config['rope_theta'] == 1e6
  with safetensors.safe_open(tmp_path / 'model.safetensors', framework='numpy') as f:
    assert {f.get_slice(name).get_dtype() for name in f.keys()} == {'BF16'}
    q = f.get_tensor('model.layers.1.self_attn.q_proj.weight')
  wq = np.asarray(params['blocks']['attn']['wq'][1])  # [D, N, H]
  np.testing.assert_array_equal(q, wq.reshape(64, -1).T.astype(q.dtype))
  model = clm_jax.load(tmp_path)
  assert model.config.dtype == 'bfloat16'
  assert _rel(model.logits(TOKENS), _our_logits(cfg, params)) < 3e-2


def test_loads_onto_a_mesh_in_the_rules_shardings(llama, tiny_config):
  c = tiny_config
  c.mesh.update(data=2, tensor=2, pipeline=2)
  mesh = sharding.make_mesh(c.mesh)
  model = clm_jax.load(llama[0], mesh)
  # Column-parallel q/k/v/gate/up, row-parallel o/down, vocab-parallel
  # embedding and head, layers over 'pipeline' (the rules table).
  want = {
    'embed': P('tensor', None),
    'lm_head': P(None, 'tensor'),
    'final_norm/scale': P(),
    'blocks/attn/wq': P('pipeline', None, 'tensor', None),
    'blocks/attn/wk': P('pipeline', None, 'tensor', None),
    'blocks/attn/wv': P('pipeline', None, 'tensor', None),
    'blocks/attn/wo': P('pipeline', 'tensor', None, None),
    'blocks/mlp/w_gate': P('pipeline', None, 'tensor'),
    'blocks/mlp/w_up': P('pipeline', None, 'tensor'),
    'blocks/mlp/w_down': P('pipeline', 'tensor', None),
    'blocks/attn_norm/scale': P('pipeline', None),
    'blocks/mlp_norm/scale': P('pipeline', None),
  }
  got = {key.ours: functools.reduce(operator.getitem, key.path, model.params) for key in hf.KEYS}
  assert set(got) == set(want)
  for path, spec in want.items():
    x = got[path]
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (path, x.sharding)
  assert _rel(model.logits(TOKENS), llama[1]) < 1e-4


def test_clm_jax_checkpoints_to_and_from_hf(llama, tok_path, tiny_config, tmp_path):
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  for file in llama[0].iterdir():
    (hf_dir / file.name).write_bytes(file.read_bytes())
  (hf_dir / tokenizer.TOKENIZER_FILE).write_bytes(tok_path.read_bytes())
  hf.convert_from_hf(hf_dir, tmp_path / 'params')
  params, config, tok = params_lib.load_params(tmp_path / 'params')
  assert tok == tok_path.read_bytes()
  assert config['model']['num_kv_heads'] == 2 and config['model']['rope_theta'] == 1e6
  model = clm_jax.load(tmp_path / 'params')
  assert model.tokenizer.vocab_size == 400
  assert _rel(model.logits(TOKENS), llama[1]) < 1e-4
  out = hf.convert_to_hf(tmp_path / 'params', tmp_path / 'back', dtype='float32', progress=False)
  assert out['step'] is None
  assert _rel(_transformers_logits(tmp_path / 'back'), llama[1]) < 1e-4
  assert (tmp_path / 'back' / tokenizer.TOKENIZER_FILE).read_bytes() == tok_path.read_bytes()

  # A training run's latest checkpoint, as `train` writes it.
  c = tiny_config
  c.model.update(hf.read_hf_config(hf_dir))
  run = tmp_path / 'run'
  ckpt = checkpoint.Checkpointer(run, c.checkpoint)
  data_it = iter(grain.MapDataset.range(4).to_iter_dataset())
  state = {'step': np.int32(7), 'params': params, 'opt_state': {'mu': params}}
  ckpt.save(7, state, data_it, config=c.to_dict(), tokenizer_path=tok_path, loop={})
  ckpt.wait()
  ckpt.close()
  assert _rel(clm_jax.load(run).logits(TOKENS), llama[1]) < 1e-4
  out = hf.convert_to_hf(run, tmp_path / 'from_run', dtype='float32', progress=False)
  assert out['step'] == 7
  assert _rel(_transformers_logits(tmp_path / 'from_run'), llama[1]) < 1e-4


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


def _drop_tensor(directory, name):
  tensors = safetensors.numpy.load_file(directory / 'model.safetensors')
  del tensors[name]
  safetensors.numpy.save_file(tensors, directory / 'model.safetensors')


def _config(**changes):
  return lambda d: _write_config(d, **changes)


@pytest.mark.parametrize(
  'break_it, error, match',
  [
    pytest.param(
      lambda d: (d / 'config.json').unlink(), FileNotFoundError, 'config.json', id='no_config'
    ),
    pytest.param(
      lambda d: (d / 'model.safetensors').unlink(),
      FileNotFoundError,
      r'no \*\.safetensors',
      id='no_safetensors',
    ),
    pytest.param(
      _config(rope_scaling={'rope_type': 'linear', 'factor': 2.0}),
      hf.HFError,
      'rope_scaling',
      id='rope_scaling',
    ),
    pytest.param(
      _config(rope_parameters={'rope_type': 'llama3', 'rope_theta': 5e5}),
      hf.HFError,
      'rope_parameters',
      id='rope_parameters',
    ),
    pytest.param(_config(tie_word_embeddings=True), hf.HFError, 'tie_word_embeddings', id='tied'),
    pytest.param(_config(attention_bias=True), hf.HFError, 'attention_bias', id='attn_bias'),
    pytest.param(_config(mlp_bias=True), hf.HFError, 'mlp_bias', id='mlp_bias'),
    pytest.param(_config(head_dim=32), hf.HFError, 'head_dim', id='head_dim'),
    pytest.param(
      _config(num_hidden_layers='drop'), hf.HFError, 'num_hidden_layers', id='missing_key'
    ),
    pytest.param(
      lambda d: _drop_tensor(d, 'lm_head.weight'),
      hf.HFError,
      'no tensor lm_head.weight',
      id='missing_tensor',
    ),
    pytest.param(
      _config(intermediate_size=64),
      hf.HFError,
      r'gate_proj.weight reads as \(16, 32\).*\(16, 64\)',
      id='wrong_shape',
    ),
    pytest.param(
      lambda d: (d / hf.INDEX_FILE).write_text(
        '{"weight_map": {"lm_head.weight": "x.safetensors"}}'
      ),
      FileNotFoundError,
      'names x.safetensors',
      id='index_names_a_missing_file',
    ),
  ],
)
def test_bad_inputs_name_the_file_and_key(tmp_path, break_it, error, match):
  _numpy_llama(tmp_path, 32, 16, 32, 2, 4)
  break_it(tmp_path)
  with pytest.raises(error, match=match):
    hf.load_hf(tmp_path, progress=False)


def _index_outside(name):
  """Moves the tensors beside the model directory and indexes them there as `name`."""

  def break_it(directory):
    outside = directory.parent / 'outside.safetensors'
    (directory / 'model.safetensors').rename(outside)
    with safetensors.safe_open(outside, framework='numpy') as f:
      weight_map = dict.fromkeys(f.keys(), name.format(parent=directory.parent))
    (directory / hf.INDEX_FILE).write_text(json.dumps({'weight_map': weight_map}))

  return break_it


def _cut_safetensors(directory):
  path = directory / 'model.safetensors'
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _huge_header(directory):
  path = directory / 'model.safetensors'
  data = path.read_bytes()
  path.write_bytes((2**62).to_bytes(8, 'little') + data[8:])


def _write(name, text):
  return lambda d: (d / name).write_text(text)


@pytest.mark.parametrize(
  'break_it, match',
  [
    pytest.param(
      _index_outside('../outside.safetensors'),
      r'model\.safetensors\.index\.json: .*\.\./outside\.safetensors.*outside',
      id='index_names_outside',
    ),
    pytest.param(
      _index_outside('{parent}/outside.safetensors'),
      r'model\.safetensors\.index\.json: .*/outside\.safetensors.*outside',
      id='index_names_an_absolute_path',
    ),
    pytest.param(
      _write('config.json', '{"model_type": "llama",'), r'config\.json: not valid JSON', id='config'
    ),
    pytest.param(_write('config.json', '[1, 2]'), r'config\.json: .*not a JSON object', id='list'),
    pytest.param(
      _write(hf.INDEX_FILE, '{"weight_map": '),
      r'model\.safetensors\.index\.json: not valid JSON',
      id='index_json',
    ),
    pytest.param(
      _write(hf.INDEX_FILE, '{"metadata": {}}'),
      r'model\.safetensors\.index\.json: weight_map',
      id='index_without_weight_map',
    ),
    pytest.param(_cut_safetensors, r'model\.safetensors: .*incomplete', id='truncated'),
    pytest.param(_huge_header, r'model\.safetensors: .*header too large', id='huge_header'),
    pytest.param(_config(num_attention_heads=0), 'num_attention_heads=0', id='heads_0'),
    pytest.param(_config(hidden_size=-16), 'hidden_size=-16', id='negative_size'),
    pytest.param(_config(num_hidden_layers=0), 'num_hidden_layers=0', id='layers_0'),
    pytest.param(_config(num_key_value_heads=0), 'num_key_value_heads=0', id='kv_heads_0'),
    pytest.param(_config(vocab_size='32'), "vocab_size='32'", id='size_as_text'),
    pytest.param(_config(intermediate_size=True), 'intermediate_size=True', id='size_as_bool'),
    pytest.param(_config(rms_norm_eps=-1.0), 'rms_norm_eps=-1.0', id='negative_eps'),
    pytest.param(_config(rope_scaling='linear'), "rope_scaling='linear'", id='rope_as_text'),
  ],
)
def test_hostile_files_give_one_error_naming_the_file_and_key(tmp_path, break_it, match):
  directory = tmp_path / 'model'
  directory.mkdir()
  _numpy_llama(directory, 32, 16, 32, 2, 4)
  break_it(directory)
  with pytest.raises(hf.HFError, match=match) as info:
    hf.load_hf(directory, progress=False)
  assert str(directory) in str(info.value)


def test_load_names_what_it_expects(tmp_path):
  with pytest.raises(FileNotFoundError, match='params-only checkpoint'):
    clm_jax.load(tmp_path)
  with pytest.raises(ValueError, match='token ids must be in'):
    loaded.Model(types.SimpleNamespace(vocab_size=4), {}).logits([[1, 4]])
  with pytest.raises(ValueError, match='one length'):
    loaded.Model(types.SimpleNamespace(vocab_size=4), {}).logits([[1, 2], [3]])


@pytest.mark.parametrize('kv_heads', [2, 1])
def test_greedy_generation_equals_transformers(tmp_path, kv_heads):
  _tiny_llama(tmp_path, kv_heads=kv_heads)
  theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  model = clm_jax.load(tmp_path)
  prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :12].tolist()]  # Left-padded together.
  got = model.generate(prompts, max_new_tokens=12)
  for prompt, new in zip(prompts, got, strict=True):
    with torch.no_grad():
      want = theirs.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )[0, len(prompt) :].tolist()
    assert new == want
