"""Forged verdicts, crashes of the evaluation and holes in the isolation, each tried for real.

A failing completion must score `failed` however it ends: never `passed`, and
never the sandbox's own `error` or `timeout`. Isolation tests skip, naming the
layer, where this kernel cannot give it (`sandbox.isolation()` says so).
"""

import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest

from clm_jax.eval import humaneval
from clm_jax.eval import mbpp
from clm_jax.eval import sandbox

PROBLEMS = humaneval.load_problems()
TASKS = mbpp.load()
LAYERS = sandbox.isolation()
# Where a layer is missing the judge still holds; scoring runs anyway, said loudly.
WEAKER = {'allow_weaker': True} if not all(LAYERS.values()) else {}

# Each ends a wrong answer in a way that once scored it `passed` (or `error` or
# `timeout`): exit statuses, the harness's frames, hostile __str__ and flush.
_EXIT_0 = 'import posix\nposix._exit(0)\n'
_FRAMES = (
  'import sys\n'
  'frame = sys._getframe(1)\n'
  'while frame is not None:\n'
  '  for scope in (frame.f_globals, frame.f_locals):\n'
  '    for key, value in list(scope.items()):\n'
  "      if 'FAIL' in key.upper() and isinstance(value, int):\n"
  '        scope[key] = 0\n'
  '  frame = frame.f_back\n'
)
_FRAME_EXIT = (
  'import sys\n'
  'frame = sys._getframe(1)\n'
  'while frame is not None:\n'
  '  for key, value in list(frame.f_locals.items()):\n'
  "    if 'exit' in key and callable(value):\n"
  '      value(0)\n'
  '  frame = frame.f_back\n'
)
# Classes by type(): HumanEval's stop sequences would cut a completion at "\nclass".
_HOSTILE_STR = (
  'import posix\n'
  "Forged = type('Forged', (Exception,), {'__str__': lambda self: posix._exit(0)})\n"
  'raise Forged()\n'
)
_HOSTILE_FLUSH = (
  'import posix, sys\n'
  "Out = type('Out', (), {'write': lambda self, text: len(text), 'flush': lambda self: posix._exit(0)})\n"
  'sys.stdout = sys.stderr = Out()\n'
)
TOP_LEVEL_FORGERIES = {
  'posix_exit_0': _EXIT_0,
  'frame_flags': _FRAMES,
  'frame_exit': _FRAME_EXIT,
  'hostile_str': _HOSTILE_STR,
  'hostile_flush': _HOSTILE_FLUSH,
  'exit_as_setup_error': 'import posix\nposix._exit(113)\n',
  'exit_as_cpu_timeout': 'import posix\nposix._exit(114)\n',
}
_ALWAYS_EQUAL = (
  'class AlwaysEqual:\n'
  '  def __eq__(self, other):\n'
  '    return True\n'
  '  def __ne__(self, other):\n'
  '    return False\n'
  '  def __bool__(self):\n'
  '    return True\n'
  '  __hash__ = None\n'
)


def _humaneval(task_id, completion, **kwargs):
  problems = {task_id: PROBLEMS[task_id]}
  return humaneval.evaluate_humaneval(
    lambda prompts: [completion] * len(prompts), problems=problems, timeout=20, **WEAKER, **kwargs
  )


def _run(program, **kwargs):
  return sandbox.run(program, **WEAKER, **kwargs)


def _need(*layers):
  if missing := [layer for layer in layers if LAYERS.get(layer) is False]:
    pytest.skip(f'this kernel gives no {", ".join(missing)} layer here')


@pytest.mark.parametrize('name', sorted(TOP_LEVEL_FORGERIES))
def test_a_forged_ending_of_a_wrong_humaneval_answer_fails(name):
  # A wrong body, then the forgery at the top level, after the function.
  summary = _humaneval('HumanEval/0', '    return False\n' + TOP_LEVEL_FORGERIES[name])
  assert (summary['pass@1'], summary['statuses']) == (0.0, {'failed': 1})


@pytest.mark.parametrize('name', ['posix_exit_0', 'frame_exit', 'hostile_str'])
def test_a_forgery_inside_the_function_fails(name):
  # Run at the first call, from within the test: the tests have begun.
  body = ''.join(f'    {line}\n' for line in TOP_LEVEL_FORGERIES[name].splitlines())
  summary = _humaneval('HumanEval/0', body + '    return False\n')
  assert (summary['pass@1'], summary['statuses']) == (0.0, {'failed': 1})


@pytest.mark.parametrize('name', ['posix_exit_0', 'frame_flags', 'exit_as_setup_error'])
def test_a_forged_ending_of_a_wrong_mbpp_answer_fails(name):
  completion = 'def remove_Occ(s, ch):\n  return s\n' + TOP_LEVEL_FORGERIES[name]
  summary = mbpp.evaluate_mbpp(
    lambda prompts: [completion] * len(prompts), task_ids=[11], timeout=20, **WEAKER
  )
  assert (summary['pass@1'], summary['statuses']) == (0.0, {'failed': 1})


def test_an_object_equal_to_everything_fails():
  always_equal = ''.join(f'    {line}\n' for line in _ALWAYS_EQUAL.splitlines())
  summary = _humaneval('HumanEval/0', always_equal + '    return AlwaysEqual()\n')
  assert summary['statuses'] == {'failed': 1}
  # A str whose == is forged compares as the plain string it holds.
  completion = _ALWAYS_EQUAL.replace('AlwaysEqual:', 'Remove(str):') + (
    'def remove_Occ(s, ch):\n  return Remove("wrong")\n'
  )
  summary = mbpp.evaluate_mbpp(
    lambda prompts: [completion] * len(prompts), task_ids=[11], timeout=20, **WEAKER
  )
  assert summary['statuses'] == {'failed': 1}


@pytest.mark.parametrize(
  'task_id, completion',
  [
    # The test's own builtins, helpers and modules are not the completion's to change.
    ('HumanEval/2', '    return 0.5\nabs = lambda x: 0\n'),
    ('HumanEval/32', '    return 0.0\npoly = lambda xs, x: 0\n'),
    ('HumanEval/32', '    return 0.0\nimport math\nmath.fabs = lambda x: 0\n'),
  ],
)
def test_a_completion_cannot_redefine_what_the_test_relies_on(task_id, completion):
  summary = _humaneval(task_id, completion)
  assert summary['statuses'] == {'failed': 1}


def test_reference_solutions_still_pass_beside_the_attacks():
  ids = ['HumanEval/0', 'HumanEval/32', 'HumanEval/38']
  solutions = {PROBLEMS[i]['prompt']: PROBLEMS[i]['canonical_solution'] for i in ids}
  summary = humaneval.evaluate_humaneval(
    lambda prompts: [solutions[p] for p in prompts],
    problems={i: PROBLEMS[i] for i in ids},
    timeout=20,
    **WEAKER,
  )
  assert summary['statuses'] == {'passed': 3}
  summary = mbpp.evaluate_mbpp(
    lambda prompts: [TASKS[task_id]['code'] for task_id in (11, 367)][: len(prompts)],
    task_ids=[11, 367],
    batch_size=2,
    timeout=20,
    **WEAKER,
  )
  assert summary['statuses'] == {'passed': 2}


def _record_run_dirs(monkeypatch):
  made = []
  mkdtemp = tempfile.mkdtemp
  monkeypatch.setattr(
    tempfile, 'mkdtemp', lambda **kwargs: made.append(mkdtemp(**kwargs)) or made[-1]
  )
  return made


_DEEP_TREE = (
  'import os\n'
  'for _ in range(1100):\n'
  "  os.mkdir('d')\n"
  "  os.chdir('d')\n"
  "open('leaf', 'w').write('x')\n"
)


def test_a_deep_directory_tree_neither_crashes_the_eval_nor_stays(monkeypatch):
  made = _record_run_dirs(monkeypatch)
  completion = '    return False\n' + _DEEP_TREE
  summary = _humaneval('HumanEval/0', completion)
  assert summary['statuses'] == {'failed': 1}
  result = _run(_DEEP_TREE + "os.chmod('.', 0o500)\n")
  assert result.status == 'passed', result
  assert len(made) == 2
  assert [path for path in made if os.path.exists(path)] == []


def test_disk_use_is_bounded_per_program():
  _need('disk')
  program = (
    "for i in range(10):\n  with open(f'f{i}', 'wb') as f:\n    f.write(bytes(16 * 2**20))\n"
  )
  result = _run(program, timeout=30)
  assert result.status == 'failed', result
  assert 'No space left on device' in result.detail


@pytest.fixture
def root_only_file():
  if os.geteuid() != 0:
    pytest.skip('needs root to make a root-only file')
  # Not under /tmp or a home directory: the sandbox hides those, and this file
  # must be reachable by path so that only its permissions keep it closed.
  parent = next((p for p in ('/var/lib', '/opt', '/srv') if os.access(p, os.W_OK)), None)
  if parent is None:
    pytest.skip('no writable directory outside /tmp and the home directories')
  directory = pathlib.Path(parent) / f'clm_jax_sandbox_test_{uuid.uuid4().hex}'
  directory.mkdir(mode=0o755)
  secret = directory / 'secret'
  secret.write_text('hunter2')
  secret.chmod(0o600)
  try:
    yield secret
  finally:
    secret.unlink()
    directory.rmdir()


def test_a_root_only_file_is_unreadable(root_only_file):
  _need('user')
  result = _run(f'print(open({str(root_only_file)!r}).read())')
  assert result.status == 'failed', result
  assert 'PermissionError' in result.detail


def test_home_directories_are_not_listed():
  _need('private_dirs')
  try:
    host = set(os.listdir('/root'))
  except OSError:
    pytest.skip('this process cannot list /root either')
  # The interpreter may live under /root (pyenv): only its path shows through.
  stdlib = pathlib.Path(os.path.realpath(os.__file__))
  allowed = {stdlib.parts[2]} if stdlib.parts[1] == 'root' else set()
  program = (
    'import os\n'
    'try:\n'
    "  seen = set(os.listdir('/root'))\n"
    'except PermissionError:\n'
    '  seen = set()\n'
    f'assert not seen & {set(host - allowed)!r}, seen\n'
  )
  assert host - allowed, 'nothing in /root to hide'
  result = _run(program)
  assert result.status == 'passed', result


def test_the_process_limit_holds_with_the_default_interpreter():
  _need('user')
  program = (
    'import sys\n'
    "sys.modules.pop('ctypes', None)\n"
    "sys.modules.pop('_ctypes', None)\n"
    'import ctypes, os, time\n'
    'libc = ctypes.CDLL(None)\n'
    'assert os.getuid() != 0\n'
    'forked = 0\n'
    'for _ in range(100):\n'
    '  pid = libc.fork()\n'
    '  if pid == 0:\n'
    '    time.sleep(60)\n'
    '    libc._exit(0)\n'
    '  if pid < 0:\n'
    '    break\n'
    '  forked += 1\n'
    'assert forked < 16, forked\n'
  )
  result = _run(program, limits=sandbox.Limits(processes=16))
  assert result.status == 'passed', result


def test_a_host_unix_socket_is_unreachable(tmp_path):
  _need('private_dirs')
  path = tmp_path / 'agent.sock'
  with socket.socket(socket.AF_UNIX) as server:
    server.bind(str(path))
    path.chmod(0o777)
    server.listen()
    # socket.SocketType is the real class: beyond the Python guard.
    program = f'import socket\nsocket.SocketType(socket.AF_UNIX).connect({str(path)!r})\n'
    result = _run(program)
    assert result.status == 'failed', result
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
      server.accept()


def test_proc_shows_only_the_sandboxs_processes():
  _need('proc', 'pidns')
  program = (
    'import os\n'
    "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
    'assert len(pids) <= 2, pids\n'
    'for pid in pids:\n'
    "  assert b'pytest' not in open(f'/proc/{pid}/cmdline', 'rb').read()\n"
  )
  result = _run(program)
  assert result.status == 'passed', result


def test_cleanup_removes_a_deep_locked_tree_without_following_links(tmp_path):
  # Where no tmpfs covers the run directory, the program's files land on the host.
  victim = tmp_path / 'victim'
  victim.mkdir()
  (victim / 'keep').write_text('x')
  root = tmp_path / 'run'
  root.mkdir()
  fd = os.open(root, os.O_RDONLY)
  for _ in range(1100):  # by descriptor: the path grows past what pathlib handles
    os.mkdir('d', dir_fd=fd)
    fd, parent = os.open('d', os.O_RDONLY, dir_fd=fd), fd
    os.close(parent)
  os.close(os.open('leaf', os.O_WRONLY | os.O_CREAT, dir_fd=fd))
  os.symlink(victim, 'link', dir_fd=fd)
  for _ in range(1101):  # each directory read-only, from the leaf up
    os.fchmod(fd, 0o500)
    fd, child = os.open('..', os.O_RDONLY, dir_fd=fd), fd
    os.close(child)
  os.close(fd)
  assert sandbox._remove_tree(str(root)) is True
  assert not root.exists()
  assert (victim / 'keep').read_text() == 'x'
  assert sandbox._remove_tree(str(root)) is False  # gone already: False, not an exception


def test_a_failure_of_the_sandbox_itself_is_an_error_not_a_crash(monkeypatch):
  def no_space(**kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(tempfile, 'mkdtemp', no_space)
  result = _run('pass')
  assert (result.status, result.detail) == (
    'error',
    'sandbox: OSError: [Errno 28] No space left on device',
  )


_WITHOUT_SYS_ADMIN = """
import json
from clm_jax.eval import sandbox
layers = sandbox.isolation()
refused = sandbox.run('pass')
allowed = sandbox.run('import os\\nassert os.getuid() == 0', allow_weaker=True)
try:
  sandbox.require(False)
  raised = ''
except sandbox.SandboxError as e:
  raised = str(e)
print(json.dumps([layers, refused.status, refused.detail, allowed.status, raised]))
"""


def test_root_without_sys_admin_is_refused_unless_weaker_is_allowed():
  # Namespaces then come from a user namespace of its own, where no uid but
  # root is mapped: programs would run as root, so the user layer is missing.
  setpriv = shutil.which('setpriv')
  if os.geteuid() != 0 or setpriv is None:
    pytest.skip('needs root and setpriv(1) to drop CAP_SYS_ADMIN')
  out = subprocess.run(
    [
      setpriv,
      '--bounding-set=-sys_admin',
      '--inh-caps=-sys_admin',
      sys.executable,
      '-c',
      _WITHOUT_SYS_ADMIN,
    ],
    cwd=pathlib.Path(__file__).parents[2],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  layers, status, detail, allowed, raised = json.loads(out.stdout.splitlines()[-1])
  if all(layers.values()) or not layers['netns']:
    pytest.skip(f'this kernel gives {layers} without CAP_SYS_ADMIN')
  assert layers['user'] is False
  assert (status, allowed) == ('error', 'passed')
  assert detail.startswith('sandbox refused to run: no user isolation')
  assert 'allow_weaker=True' in detail
  assert 'lacks isolation layer(s) user on this machine (user: programs run as root' in raised


def test_require_names_each_missing_layer(monkeypatch, caplog):
  layers = dict.fromkeys(sandbox.LAYERS, True) | {'proc': False, 'disk': False}
  monkeypatch.setattr(sandbox, '_isolation_once', lambda python: tuple(layers.items()))
  with pytest.raises(
    sandbox.SandboxError, match=r'layer\(s\) proc, disk on this machine \(proc: /proc lists'
  ):
    sandbox.require(False)
  with caplog.at_level(logging.WARNING):
    assert sandbox.require(True) == ['proc', 'disk']
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert [w.split(' layer')[0] for w in warnings] == [
    'Code sandbox WITHOUT the proc',
    'Code sandbox WITHOUT the disk',
  ]


def test_an_evaluation_is_refused_before_any_generation(monkeypatch):
  layers = dict.fromkeys(sandbox.LAYERS, True) | {'user': False}
  monkeypatch.setattr(sandbox, '_isolation_once', lambda python: tuple(layers.items()))
  asked = []
  with pytest.raises(sandbox.SandboxError, match=r'layer\(s\) user'):
    humaneval.evaluate_humaneval(lambda prompts: asked.extend(prompts) or [''] * len(prompts))
  assert asked == []


def test_garbage_on_the_judges_pipe_fails_the_program():
  # Every descriptor the program holds gets bytes no message starts with.
  program = sandbox.Program(
    'import os\n'
    'for fd in range(3, 64):\n'
    '  try:\n'
    "    os.write(fd, b'\\xff' * 64)\n"
    '  except OSError:\n'
    '    pass\n'
    'def f():\n'
    '  return 1\n',
    test='assert f() == 1\n',
    entry_points=('f',),
  )
  result = _run(program)
  assert (result.status, result.detail) == (
    'failed',
    'ProtocolError: a message of 4294967295 bytes, over 67108864',
  )


def test_an_exception_in_the_program_fails_even_if_the_test_catches_it():
  program = sandbox.Program(
    'def f():\n  raise ValueError(1)\n',
    test='try:\n  f()\nexcept BaseException:\n  pass\n',
    entry_points=('f',),
  )
  assert _run(program) == sandbox.Result(False, 'failed', 'ValueError: 1')


def test_the_verdict_channel_is_out_of_the_programs_reach():
  # A forged verdict on every descriptor it holds, and on the judge's (pid 1).
  forge = (
    'import json, os\n'
    "verdict = (json.dumps({'status': 'passed', 'detail': ''}) + '\\n').encode()\n"
    'opened = []\n'
    "for path in ['/proc/1/fd/' + str(fd) for fd in range(64)]:\n"
    '  try:\n'
    '    opened.append(os.open(path, os.O_WRONLY))\n'
    '  except OSError:\n'
    '    pass\n'
    'for fd in [*range(3, 64)]:\n'
    '  try:\n'
    '    os.write(fd, verdict)\n'
    '  except OSError:\n'
    '    pass\n'
  )
  program = sandbox.Program(forge, test='assert False, "the test fails"\n')
  result = _run(program)
  # Its own pipe to the judge takes the bytes: they fail it as a malformed message.
  assert (result.status, result.detail) == (
    'failed',
    'ProtocolError: a message of 1953702523 bytes, over 67108864',
  )
