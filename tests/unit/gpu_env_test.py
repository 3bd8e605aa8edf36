"""GPU defaults: the user always wins, and every flag is one this jaxlib accepts."""

from clm_jax.parallel import gpu_env


def test_apply_on_an_empty_environment_adds_everything():
  environ = {}
  changed = gpu_env.apply(environ)
  flags = environ['XLA_FLAGS'].split()
  assert flags == [f'--{name}={value}' for name, value in gpu_env.XLA_GPU_FLAGS.items()]
  for name, value in gpu_env.ENV_DEFAULTS.items():
    assert environ[name] == value
  assert changed == {
    **{f'--{name}': value for name, value in gpu_env.XLA_GPU_FLAGS.items()},
    **gpu_env.ENV_DEFAULTS,
  }
  assert environ['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9'
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in flags


def test_user_flags_and_variables_win():
  environ = {
    'XLA_FLAGS': '--xla_gpu_enable_latency_hiding_scheduler=false  --xla_dump_to=/tmp/d',
    'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.5',
    'CUDA_DEVICE_MAX_CONNECTIONS': '',
  }
  changed = gpu_env.apply(environ)
  flags = environ['XLA_FLAGS'].split()
  assert flags[:2] == ['--xla_gpu_enable_latency_hiding_scheduler=false', '--xla_dump_to=/tmp/d']
  names = [flag.lstrip('-').split('=')[0] for flag in flags]
  assert names.count('xla_gpu_enable_latency_hiding_scheduler') == 1
  assert len(flags) == 1 + len(gpu_env.XLA_GPU_FLAGS)
  assert environ['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.5'
  assert environ['CUDA_DEVICE_MAX_CONNECTIONS'] == ''  # set, even if empty: the user's choice
  assert '--xla_gpu_enable_latency_hiding_scheduler' not in changed
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in changed
  assert 'CUDA_DEVICE_MAX_CONNECTIONS' not in changed
  assert changed['--xla_gpu_enable_pipelined_all_gather'] == 'true'


def test_apply_twice_changes_nothing_the_second_time():
  environ = {}
  gpu_env.apply(environ)
  before = dict(environ)
  assert gpu_env.apply(environ) == {}
  assert environ == before


def test_gpu_present_respects_jax_platforms(monkeypatch, tmp_path):
  # A machine that looks like it has a GPU, so only JAX_PLATFORMS can say no.
  (tmp_path / 'gpus' / '0000:17:00.0').mkdir(parents=True)
  monkeypatch.setattr(gpu_env, '_PROC_GPUS', str(tmp_path / 'gpus'))
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not gpu_env.gpu_present()
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert gpu_env.gpu_present()
  monkeypatch.delenv('JAX_PLATFORMS')
  assert gpu_env.gpu_present()
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
  assert not gpu_env.gpu_present()


def test_gpu_present_is_false_without_driver_devices_or_plugin(monkeypatch, tmp_path):
  monkeypatch.setattr(gpu_env, '_PROC_GPUS', str(tmp_path / 'none'))
  monkeypatch.setattr(gpu_env, '_DEV', str(tmp_path))
  monkeypatch.setattr(gpu_env, '_CUDA_PLUGINS', ('clm_jax_no_such_plugin',))
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1')
  assert not gpu_env.gpu_present()
  (tmp_path / 'nvidia0').touch()
  assert gpu_env.gpu_present()


def test_gpu_count_follows_cuda_visible_devices(monkeypatch, tmp_path):
  monkeypatch.setattr(gpu_env, '_PROC_GPUS', str(tmp_path / 'none'))
  monkeypatch.setattr(gpu_env, '_DEV', str(tmp_path))
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
  assert gpu_env.gpu_count() == 0
  for i in range(4):
    (tmp_path / f'nvidia{i}').touch()
  (tmp_path / 'nvidiactl').touch()
  assert gpu_env.gpu_count() == 4
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '2,3')
  assert gpu_env.gpu_count() == 2
