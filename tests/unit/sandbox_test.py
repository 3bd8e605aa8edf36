"""Broken and hostile programs fail without harming the host or the run.

Tests marked "beyond the guard" get around the Python prelude on purpose
(ctypes, _io, posix) to check the kernel-enforced layer behind it; they skip
where `sandbox.isolation()` says that layer is missing.
"""

import os
import pathlib
import shutil
import socket
import tempfile
import time
import uuid

import pytest

from clm_jax.eval import sandbox

# Puts back the ctypes the guard hides, as a determined program would.
_UNGUARD_CTYPES = """
import sys
for name in ('ctypes', '_ctypes'):
  sys.modules.pop(name, None)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
"""

# A world-readable interpreter lets root's sandbox drop to a fresh uid; the
# venv's may live under /root, where only root can read it.
_SYSTEM_PYTHON = shutil.which('python3', path='/usr/bin:/bin')


@pytest.fixture(scope='module')
def layers():
  return sandbox.isolation()


def _pythons():
  pythons = [None]
  if _SYSTEM_PYTHON and sandbox.isolation(_SYSTEM_PYTHON)['user']:
    pythons.append(_SYSTEM_PYTHON)
  return pythons


def _escape_path() -> pathlib.Path:
  return pathlib.Path('/tmp') / f'clm_jax_escape_{uuid.uuid4().hex}'


def _processes_named(comm: str) -> list[int]:
  """Live (not zombie) processes whose name is `comm`."""
  pids = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat') as f:
        name, _, rest = f.read().partition('(')[2].rpartition(')')
    except OSError:
      continue
    if name == comm and rest.split()[0] != 'Z':
      pids.append(int(pid))
  return pids


def test_a_correct_program_passes_and_may_use_its_directory():
  result = sandbox.run(
    'import math, pathlib, tempfile\n'
    "pathlib.Path('out.txt').write_text('x')\n"
    "with tempfile.NamedTemporaryFile('w') as f:\n"
    "  f.write('y')\n"
    "assert pathlib.Path('out.txt').read_text() == 'x'\n"
    'assert math.gcd(12, 18) == 6\n'
  )
  assert result == sandbox.Result(True, 'passed', '')


@pytest.mark.parametrize(
  'program, detail',
  [
    ('def f():\n  return 1\nassert f() == 2\n', 'AssertionError'),
    ('1 / 0', 'ZeroDivisionError: division by zero'),
    ('import sys\nsys.exit(0)', 'SystemExit: 0'),
    ('raise KeyboardInterrupt', 'KeyboardInterrupt'),
    ('def f(:\n  pass', 'SyntaxError'),
  ],
)
def test_wrong_answers_and_exceptions_fail_with_the_reason(program, detail):
  result = sandbox.run(program)
  assert (result.passed, result.status) == (False, 'failed')
  assert result.detail.startswith(detail)


def test_an_infinite_loop_times_out_on_time():
  start = time.monotonic()
  result = sandbox.run('while True:\n  pass', timeout=1.0)
  assert result == sandbox.Result(False, 'timeout', 'timed out after 1s')
  assert time.monotonic() - start < 3.0


def test_the_cpu_limit_ends_a_busy_program():
  start = time.monotonic()
  result = sandbox.run('while True:\n  pass', timeout=20, limits=sandbox.Limits(cpu_seconds=1))
  assert result == sandbox.Result(False, 'timeout', 'CPU time limit')
  assert time.monotonic() - start < 10


def test_writing_outside_the_sandbox_fails(tmp_path):
  targets = [_escape_path(), tmp_path / 'escape', pathlib.Path(__file__).parent / 'escape.py']
  for target in targets:
    result = sandbox.run(f'open({str(target)!r}, "w").write("pwned")')
    assert (result.status, target.exists()) == ('failed', False), result
    assert 'PermissionError' in result.detail


def test_deleting_and_renaming_outside_files_fails(tmp_path):
  victim = tmp_path / 'victim.txt'
  victim.write_text('keep me')
  for program in (
    f'import os\nos.remove({str(victim)!r})',
    f'import shutil\nshutil.rmtree({str(tmp_path)!r})',
    f'import os\nos.rename({str(victim)!r}, "mine.txt")',
  ):
    result = sandbox.run(program)
    assert result.status == 'failed', program
    assert victim.read_text() == 'keep me'


def test_writing_and_deleting_beyond_the_guard_fails(layers, tmp_path):
  if not layers['readonly_fs']:
    pytest.skip('no read-only mount namespace here; only the Python guard protects files')
  victim, target = tmp_path / 'victim.txt', _escape_path()
  victim.write_text('keep me')
  write = f'import _io\n_io.FileIO({str(target)!r}, "w").write(b"pwned")\n'
  for program in (
    write,
    f'import posix\nposix.unlink({str(victim)!r})',
    # Via the root of a process outside, which ptrace rules keep out of reach.
    write.replace('/tmp/', f'/proc/{os.getpid()}/root/tmp/'),
    # Undoing the read-only remount takes a capability the sandbox dropped; a
    # nested user namespace regains them, but over locked mounts.
    _UNGUARD_CTYPES + 'libc.mount(None, b"/", None, 32 | 4096, None)\n' + write,
    _UNGUARD_CTYPES
    + 'libc.unshare(0x10020000)\nlibc.mount(None, b"/", None, 32 | 4096, None)\n'
    + write,
  ):
    result = sandbox.run(program)
    assert result.status == 'failed', program
    assert not target.exists()
    assert victim.read_text() == 'keep me'


def test_a_huge_allocation_fails_with_memory_error():
  assert sandbox.run('x = bytearray(10**11)') == sandbox.Result(False, 'failed', 'MemoryError')
  # bytes() of zeros is calloc'd: the pages are never touched, so this is quick.
  result = sandbox.run('chunks = [bytes(2**28) for _ in range(64)]')
  assert result == sandbox.Result(False, 'failed', 'MemoryError')


def test_flooding_the_output_fails_at_the_file_size_limit():
  limits = sandbox.Limits(file_bytes=2**20)
  result = sandbox.run("while True:\n  print('x' * 4096)", timeout=20, limits=limits)
  assert (result.status, result.detail) == ('failed', 'OSError: [Errno 27] File too large')


def test_a_fork_bomb_fails_at_once():
  start = time.monotonic()
  result = sandbox.run('import os\nwhile True:\n  os.fork()', timeout=10)
  assert result == sandbox.Result(
    False, 'failed', 'PermissionError: os.fork is disabled in the sandbox'
  )
  assert time.monotonic() - start < 5


@pytest.mark.parametrize('leave', ['exit', 'hang'])
@pytest.mark.parametrize('python', _pythons())
@pytest.mark.parametrize('new_session', [False, True])
def test_no_process_outlives_its_run_beyond_the_guard(layers, python, new_session, leave):
  if new_session and not (layers['pidns'] or sandbox.isolation(python)['user']):
    pytest.skip('no pid namespace or fresh uid here: a setsid() child escapes the group')
  # Children inherit the name, so the test can find every one of them.
  name = f'cj{uuid.uuid4().hex[:12]}'
  program = (
    _UNGUARD_CTYPES
    + (
      'import time\n'
      f'libc.prctl(15, {name.encode()!r}, 0, 0, 0)\n'
      'for _ in range(8):\n'
      '  if libc.fork() == 0:\n'
      f'    {"libc.setsid()" if new_session else "pass"}\n'
      '    time.sleep(60)\n'
      '    libc._exit(0)\n'  # never back into the loop
    )
    + ('time.sleep(60)\n' if leave == 'hang' else '')
  )
  result = sandbox.run(program, timeout=1.5, python=python)
  assert result.status == ('timeout' if leave == 'hang' else 'passed'), result
  # SIGKILL takes a moment to land where there is no pid namespace to wait on.
  deadline = time.monotonic() + 2
  while _processes_named(name) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _processes_named(name) == []


def test_a_fresh_uid_caps_the_number_of_processes():
  if not (os.geteuid() == 0 and _SYSTEM_PYTHON and sandbox.isolation(_SYSTEM_PYTHON)['user']):
    pytest.skip('needs root and a world-readable python3 to drop privileges')
  program = _UNGUARD_CTYPES + (
    'import os, time\n'
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
  limits = sandbox.Limits(processes=16)
  assert sandbox.run(program, limits=limits, python=_SYSTEM_PYTHON).passed


def test_no_network_not_even_loopback(layers):
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    port = server.getsockname()[1]
    programs = [f'import socket\nsocket.create_connection(("127.0.0.1", {port}), timeout=2)']
    if layers['netns']:
      # socket.SocketType is the real class: beyond the guard, the namespace holds.
      programs.append(f'import socket\nsocket.SocketType().connect(("127.0.0.1", {port}))')
    for program in programs:
      result = sandbox.run(program)
      assert result.status == 'failed', program
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
      server.accept()


def test_subprocesses_are_refused():
  target = _escape_path()
  result = sandbox.run(f'import subprocess\nsubprocess.run(["sh", "-c", "echo hi > {target}"])')
  assert result == sandbox.Result(
    False, 'failed', 'PermissionError: subprocess.Popen is disabled in the sandbox'
  )
  assert not target.exists()


def test_the_environment_and_temporary_directory_are_private(monkeypatch):
  monkeypatch.setenv('CLM_JAX_SECRET', 'hunter2')
  made = []
  mkdtemp = tempfile.mkdtemp
  monkeypatch.setattr(
    tempfile, 'mkdtemp', lambda **kwargs: made.append(mkdtemp(**kwargs)) or made[-1]
  )
  result = sandbox.run(
    'import os, pathlib, tempfile\n'
    "assert 'CLM_JAX_SECRET' not in os.environ\n"
    "assert os.environ['HOME'] == os.getcwd() == tempfile.gettempdir()\n"
    "pathlib.Path('left_behind').mkdir()\n"
    "pathlib.Path('left_behind/file').write_text('x')\n"
    "os.chmod('left_behind', 0)\n"
  )
  assert result.passed, result
  assert len(made) == 1 and not os.path.exists(made[0])


def test_run_many_keeps_order_and_runs_in_parallel():
  programs = ['import time\ntime.sleep(1)\nassert 1 == 1', 'assert 1 == 2'] * 2
  start = time.monotonic()
  results = sandbox.run_many(programs, timeout=10, max_workers=4)
  assert [r.passed for r in results] == [True, False, True, False]
  assert time.monotonic() - start < 3.5


def test_a_broken_sandbox_is_an_error_not_a_failure():
  result = sandbox.run('pass', python='/nonexistent/python')
  assert (result.passed, result.status) == (False, 'error')
