"""Runs untrusted, model-written Python programs, each in a throwaway process.

A program passes when it runs to the end; any exception, signal, timeout or
escape attempt fails it. The layers, kernel-enforced first:

  process      `python -I -S -B` (standard library only) in its own session,
               with a minimal environment (no parent secrets) and stdin from
               /dev/null. On timeout, and after every run, the whole process
               group is SIGKILLed.
  directory    a fresh temporary directory as cwd, HOME and TMPDIR, removed after.
  rlimits      address space, CPU seconds, file size (output included), open
               files, processes; no core dumps.
  user         as root, a fresh unused uid, if the interpreter is readable by
               others (not one under /root): root's files become unwritable,
               RLIMIT_NPROC bites (it never does for root) and every process of
               the uid is SIGKILLed after the run.
  netns        a private network namespace: no network, not even loopback.
  pidns        a private pid namespace: the program sees and signals only its
               own processes, and when it ends the kernel kills all of them,
               setsid() or not.
  readonly_fs  a private mount namespace in which every mount but the temporary
               directory is read-only.
  no capabilities, no_new_privs: nothing can undo the above or gain privileges.
  guard        a Python prelude after OpenAI human-eval's `reliability_guard`:
               fork, exec, kill, subprocess and sockets raise PermissionError,
               and so do open, remove, rename, mkdir, chmod... outside the
               temporary directory.

The namespaces come from unshare(2) through ctypes (os.unshare is 3.12+): as
root with CAP_SYS_ADMIN directly, else inside an unprivileged user namespace.
Where the kernel refuses both (Docker's default seccomp profile does), the
guard is all that keeps the program off the network and the file system, and
the guard is NOT a security boundary: `_io`, `posix`, `ctypes` get around it.
It stops a model's accidents, not an adversary. `isolation()` tells which
layers hold; run large evaluations in a disposable container or VM regardless.

This file is also the child: the parent runs it as a script in isolated mode,
so it imports nothing outside the standard library.
"""

import _posixsubprocess
import _socket
import builtins
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import io
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types

_PROGRAM_FILE = 'program.py'
_EXIT_FAILED = 1
# A setup failure is the harness's fault, not the program's: reported as 'error'.
_EXIT_SETUP = 113
_EXIT_CPU = 114
_DETAIL_CHARS = 300
_OUTPUT_TAIL_BYTES = 4096

# <sched.h>, <sys/mount.h>, <sys/prctl.h>, <linux/capability.h>
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 1
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_RELATIME = 1 << 21
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_CAPABILITY_VERSION_3 = 0x20080522
# statvfs flags a remount inside a user namespace must keep (they are locked).
_LOCKED_FLAGS = (
  (os.ST_NOSUID, os.ST_NOSUID),
  (os.ST_NODEV, os.ST_NODEV),
  (os.ST_NOEXEC, os.ST_NOEXEC),
  (os.ST_NOATIME, os.ST_NOATIME),
  (os.ST_NODIRATIME, os.ST_NODIRATIME),
  (os.ST_RELATIME, _MS_RELATIME),
)

_uid_lock = threading.Lock()
_uids_in_use = set()


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program resource limits (each one an rlimit of the child).

  Attributes:
    memory_bytes: Address space (RLIMIT_AS); past it allocations raise MemoryError.
    cpu_seconds: CPU time (RLIMIT_CPU); None: the wall-clock timeout, plus two.
    file_bytes: Largest file the program may write (RLIMIT_FSIZE), its output included.
    open_files: File descriptors (RLIMIT_NOFILE).
    processes: Processes and threads of the program's user (RLIMIT_NPROC); no
      limit at all where the program runs as root.
  """

  memory_bytes: int = 2 * 1024**3
  cpu_seconds: int | None = None
  file_bytes: int = 16 * 1024**2
  open_files: int = 64
  processes: int = 16


@dataclasses.dataclass(frozen=True)
class Result:
  """How one program ended.

  Attributes:
    passed: It ran to the end without an exception.
    status: 'passed', 'failed' (exception or signal), 'timeout' (wall clock or
      CPU limit) or 'error' (the sandbox itself failed; not the program's fault).
    detail: A short reason, e.g. 'AssertionError' or 'NameError: name 'x' is not defined'.
  """

  passed: bool
  status: str
  detail: str


def run(
  program: str, *, timeout: float = 3.0, limits: Limits | None = None, python: str | None = None
) -> Result:
  """Runs the Python source `program` in a fresh sandboxed process.

  Args:
    program: Python source, run as `__main__`.
    timeout: Wall-clock seconds, interpreter start included.
    limits: Resource limits; default `Limits()`.
    python: The interpreter; default this one. It runs with `-I -S`: the
      standard library only, no site-packages.

  Returns:
    How it ended. Never raises for anything the program does.
  """
  return _execute(program, timeout, limits or Limits(), python or sys.executable)[0]


def run_many(
  programs: list[str],
  *,
  timeout: float = 3.0,
  limits: Limits | None = None,
  max_workers: int | None = None,
  python: str | None = None,
) -> list[Result]:
  """`run`s `programs` in parallel, at most `max_workers` (default: `workers()`) at once."""
  with concurrent.futures.ThreadPoolExecutor(max_workers or workers()) as pool:
    return list(pool.map(lambda p: run(p, timeout=timeout, limits=limits, python=python), programs))


def workers() -> int:
  """The CPUs this process may use (a SLURM job's share, not the node's count)."""
  return len(os.sched_getaffinity(0))


def isolation(python: str | None = None) -> dict[str, bool]:
  """Which optional layers (see the module docstring) hold here, for `python`.

  Returns:
    {'user', 'no_new_privs', 'netns', 'pidns', 'readonly_fs'} -> bool, as a
    trivial program's sandbox reported them; all False if it could not start.
  """
  result, report = _execute('pass', 10.0, Limits(), python or sys.executable)
  keys = ('user', 'no_new_privs', 'netns', 'pidns', 'readonly_fs')
  return (
    {key: bool(report.get(key)) for key in keys} if result.passed else dict.fromkeys(keys, False)
  )


# ---------------------------------------------------------------------------
# Parent side


def _execute(program: str, timeout: float, limits: Limits, python: str) -> tuple[Result, dict]:
  run_dir = os.path.realpath(tempfile.mkdtemp(prefix='clm_jax_sandbox_'))
  uid = _claim_uid() if os.geteuid() == 0 and _runs_unprivileged(python) else None
  channel_r, channel_w = os.pipe()
  try:
    with open(os.path.join(run_dir, _PROGRAM_FILE), 'w', encoding='utf-8') as f:
      f.write(program)
    if uid is not None:
      os.chown(run_dir, uid, uid)
    cpu = limits.cpu_seconds or int(timeout) + 2
    config = dict(dataclasses.asdict(limits), cpu_seconds=cpu, uid=uid, channel_fd=channel_w)
    env = {'PATH': '/usr/bin:/bin', 'HOME': run_dir, 'TMPDIR': run_dir, 'LANG': 'C.UTF-8'}
    with tempfile.TemporaryFile() as output:
      try:
        proc = subprocess.Popen(
          [python, '-I', '-S', '-B', os.path.abspath(__file__), json.dumps(config)],
          cwd=run_dir,
          env=env,
          stdin=subprocess.DEVNULL,
          stdout=output,
          stderr=subprocess.STDOUT,
          pass_fds=(channel_w,),
          start_new_session=True,
        )
      except OSError as e:
        return Result(False, 'error', f'could not start: {e}'[:_DETAIL_CHARS]), {}
      finally:
        os.close(channel_w)
      try:
        timed_out = not _wait_unreaped(proc.pid, timeout)
        if timed_out:
          # SIGTERM first: a leader waiting on a pid namespace's init kills and
          # reaps it, rather than leave it to the host's init as a zombie.
          with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
          _wait_unreaped(proc.pid, 0.5)
      finally:  # on Ctrl-C too
        # The leader is not reaped yet, so its pid (the group id) is not reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
          os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if uid is not None:
          _kill_uid(uid)
      output.seek(max(0, output.seek(0, io.SEEK_END) - _OUTPUT_TAIL_BYTES))
      tail = output.read().decode('utf-8', 'replace')
    report, summary = _read_channel(channel_r)
    return _classify(proc.returncode, timed_out, summary or tail, timeout), report
  finally:
    os.close(channel_r)
    shutil.rmtree(run_dir, onerror=_force_remove)
    if uid is not None:
      with _uid_lock:
        _uids_in_use.discard(uid)


@functools.cache
def _runs_unprivileged(python: str) -> bool:
  # An interpreter installed under /root (pyenv, for one) cannot import its own
  # standard library once the child gives up root; then the child keeps root.
  uid = _claim_uid()
  try:
    probe = subprocess.run(
      [python, '-I', '-S', '-B', '-c', 'import ctypes, json, math, resource, socket'],
      cwd='/',
      env={'PATH': '/usr/bin:/bin'},
      stdin=subprocess.DEVNULL,
      capture_output=True,
      user=uid,
      group=uid,
      extra_groups=[],
      timeout=30,
    )
    return probe.returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False
  finally:
    with _uid_lock:
      _uids_in_use.discard(uid)


def _claim_uid() -> int:
  # No passwd entry is needed. Real accounts sit at the bottom of the range the
  # kernel maps (the whole 32 bits on a host, often 65536 in a container), so a
  # random uid from its upper half belongs to no one, not even a concurrent run.
  # The top two (nobody, overflow) stay out.
  with open('/proc/self/uid_map') as f:
    ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
  start, _, count = max(ranges, key=lambda r: r[2])
  high = min(start + count - 2, 2**31 - 1)
  with _uid_lock:
    while (uid := random.randrange((start + high) // 2, high)) in _uids_in_use:
      pass
    _uids_in_use.add(uid)
  return uid


def _wait_unreaped(pid: int, timeout: float) -> bool:
  """Waits until `pid` exits, without reaping it (Linux 5.3+); False on timeout."""
  fd = os.pidfd_open(pid)
  try:
    return bool(select.select([fd], [], [], timeout)[0])
  finally:
    os.close(fd)


def _kill_uid(uid: int) -> None:
  # Processes that left the group (setsid) still carry the uid. A few passes
  # catch any forked between a scan and the kills.
  for _ in range(20):
    pids = [pid for pid in os.listdir('/proc') if pid.isdigit() and _uid_of(pid) == uid]
    if not pids:
      return
    for pid in pids:
      with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.01)


def _uid_of(pid: str) -> int | None:
  try:
    with open(f'/proc/{pid}/status') as f:
      return next(int(line.split()[1]) for line in f if line.startswith('Uid:'))
  except (OSError, StopIteration):
    return None


def _read_channel(fd: int) -> tuple[dict, str]:
  """The child's isolation report and, if the program raised, its exception."""
  os.set_blocking(fd, False)
  try:
    report, _, summary = os.read(fd, 65536).decode('utf-8', 'replace').partition('\n')
    return json.loads(report), summary
  except (BlockingIOError, ValueError):
    return {}, ''


def _classify(returncode: int, timed_out: bool, tail: str, timeout: float) -> Result:
  lines = [line for line in tail.splitlines() if line.strip()]
  last = lines[-1].strip()[:_DETAIL_CHARS] if lines else ''
  if timed_out:
    return Result(False, 'timeout', f'timed out after {timeout:g}s')
  if returncode == 0:
    return Result(True, 'passed', '')
  if returncode == _EXIT_SETUP:
    return Result(False, 'error', last or 'sandbox setup failed')
  if returncode in (_EXIT_CPU, -signal.SIGXCPU):
    return Result(False, 'timeout', 'CPU time limit')
  if returncode == -signal.SIGKILL:  # not ours: the hard CPU limit, or out of memory
    return Result(False, 'failed', 'killed by SIGKILL (CPU time or memory limit)')
  if returncode < 0:
    return Result(False, 'failed', f'killed by {signal.Signals(-returncode).name}')
  return Result(False, 'failed', last or f'exit code {returncode}')


def _force_remove(function, path, _) -> None:
  # The program may have made its files read-only; that must not stop cleanup.
  try:
    os.chmod(os.path.dirname(path), 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
      os.chmod(path, 0o700)
    function(path)
  except OSError:
    pass


# ---------------------------------------------------------------------------
# Child side: runs as `python -I -S -B sandbox.py CONFIG` in the run directory.


def _child_main(config: dict) -> None:
  exit_, write, channel = os._exit, os.write, config['channel_fd']  # before the guard
  try:
    run_dir = os.getcwd()
    report = _isolate(config, run_dir)
    # Not for the program's children; and a full pipe must not hang the child.
    os.set_inheritable(channel, False)
    os.set_blocking(channel, False)
    write(channel, json.dumps(report).encode() + b'\n')
    if report['pidns']:
      _enter_pid_namespace(ctypes.CDLL(None))
    with open(_PROGRAM_FILE, encoding='utf-8') as f:
      source = f.read()
    # pid 1 ignores SIGXCPU's default action; a handler works for any pid.
    signal.signal(signal.SIGXCPU, lambda *_: exit_(_EXIT_CPU))
    main = types.ModuleType('__main__')
    sys.modules['__main__'] = main
    _guard(run_dir)
  except BaseException as e:  # noqa: BLE001 - any setup failure is reported, not raised
    os.write(2, f'\nsandbox setup failed: {type(e).__name__}: {e}\n'.encode())
    exit_(_EXIT_SETUP)
  summary = None
  try:
    exec(compile(source, _PROGRAM_FILE, 'exec'), main.__dict__)
  except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail too
    try:
      summary = f'{type(e).__name__}: {e}' if str(e) else type(e).__name__
    except BaseException:  # noqa: BLE001 - a hostile __str__
      summary = type(e).__name__
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except BaseException:  # noqa: BLE001 - the program may have replaced or closed it
      pass
  if summary is None:
    exit_(0)
  # Through the channel: the output file may be at its size limit.
  try:
    write(channel, summary[:_DETAIL_CHARS].replace('\n', ' ').encode(errors='replace'))
  except OSError:
    pass
  exit_(_EXIT_FAILED)


def _isolate(config: dict, run_dir: str) -> dict:
  """Applies the kernel-enforced layers; returns which ones hold."""
  libc = ctypes.CDLL(None, use_errno=True)
  report = dict.fromkeys(('user', 'no_new_privs', 'netns', 'pidns', 'readonly_fs'), False)
  namespaces = _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID
  if os.geteuid() == 0 and libc.unshare(namespaces) == 0:
    report.update(netns=True, pidns=True, readonly_fs=_readonly_mounts(libc, run_dir))
  if config['uid'] is not None:
    os.setgroups([])
    os.setgid(config['uid'])
    os.setuid(config['uid'])
    report['user'] = True
    # setuid made the process undumpable, which leaves /proc/self/*_map to root.
    libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
  # Before any user namespace: the kernel fixes a new namespace's process limit
  # from the creator's RLIMIT_NPROC.
  _set_limits(config)
  if not report['netns'] and libc.unshare(_CLONE_NEWUSER | namespaces) == 0:
    uid, gid = os.getuid(), os.getgid()
    for name, text in (
      ('setgroups', 'deny'),
      ('uid_map', f'{uid} {uid} 1'),
      ('gid_map', f'{gid} {gid} 1'),
    ):
      with open(f'/proc/self/{name}', 'w') as f:
        f.write(text)
    report.update(netns=True, pidns=True, readonly_fs=_readonly_mounts(libc, run_dir))
  # With CAP_SYS_ADMIN, say, the program could remount the file system read-write.
  _drop_capabilities(libc)
  report['no_new_privs'] = libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
  return report


def _enter_pid_namespace(libc) -> None:
  """Forks the namespace's init, which returns to run the program.

  This process waits and exits as init did. When init dies, the kernel kills
  every process left in the namespace, setsid or not: nothing outlives a run.
  """
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
  pid = os.fork()
  if pid == 0:
    # Killing this process alone (not its group) must not leave init running.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    return
  # The parent's SIGTERM on timeout: end init here and reap it.
  signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
  status = _EXIT_SETUP
  try:
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status < 0:  # die of the same signal
      with contextlib.suppress(OSError, ValueError):  # SIGKILL cannot be set
        signal.signal(-status, signal.SIG_DFL)
      os.kill(os.getpid(), -status)
  finally:
    os._exit(status if status >= 0 else 128 - status)


def _set_limits(config: dict) -> None:
  for limit, value in (
    (resource.RLIMIT_AS, config['memory_bytes']),
    (resource.RLIMIT_FSIZE, config['file_bytes']),
    (resource.RLIMIT_NOFILE, config['open_files']),
    (resource.RLIMIT_NPROC, config['processes']),
    (resource.RLIMIT_CORE, 0),
  ):
    resource.setrlimit(limit, (value, value))
  # SIGXCPU at the soft limit, SIGKILL a second later (and only that for pid 1,
  # which ignores SIGXCPU).
  resource.setrlimit(resource.RLIMIT_CPU, (config['cpu_seconds'], config['cpu_seconds'] + 1))


def _readonly_mounts(libc, run_dir: str) -> bool:
  """Makes every mount read-only but a bind mount of `run_dir`; True if all took."""

  def mount(source, target, flags):
    return libc.mount(source, target.encode(), None, flags, None) == 0

  if not (mount(None, '/', _MS_REC | _MS_PRIVATE) and mount(run_dir.encode(), run_dir, _MS_BIND)):
    return False
  os.chdir(run_dir)  # the old cwd is on the mount about to turn read-only
  ok = True
  with open('/proc/self/mountinfo') as f:
    targets = [_unescape(line.split()[4]) for line in f]
  for target in targets:
    if target == run_dir:
      continue
    try:
      current = os.statvfs(target).f_flag
    except OSError:
      continue  # hidden under another mount
    if current & os.ST_RDONLY:
      continue
    keep = sum(ms for st, ms in _LOCKED_FLAGS if current & st)
    ok &= mount(None, target, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | keep)
  return ok


def _unescape(path: str) -> str:
  # mountinfo writes space, tab, newline and backslash as octal escapes.
  return path.encode().decode('unicode_escape').encode('latin-1').decode()


def _drop_capabilities(libc) -> None:
  class Header(ctypes.Structure):
    _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]

  class Data(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ('effective', 'permitted', 'inheritable')]

  # The bounding set first (that takes CAP_SETPCAP): else an exec as uid 0
  # would grant them all again. Without CAP_SETPCAP there is nothing to drop;
  # capabilities the kernel does not know fail harmlessly.
  for cap in range(64):
    libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
  if libc.capset(ctypes.byref(Header(_CAPABILITY_VERSION_3, 0)), (Data * 2)()) != 0:
    raise OSError(ctypes.get_errno(), 'capset')


def _guard(run_dir: str) -> None:
  """Disables process, network and outside-file functions (see the module docstring)."""

  def disabled(name):
    def refuse(*args, **kwargs):
      raise PermissionError(f'{name} is disabled in the sandbox')

    return refuse

  def confined(function, name, *path_args):
    def check(*args, **kwargs):
      for i in path_args:
        if i < len(args) and not _inside(run_dir, args[i], kwargs.get('dir_fd')):
          raise PermissionError(f'{name} outside the sandbox: {args[i]!r}')
      return function(*args, **kwargs)

    return check

  writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
  os_open, io_open = os.open, io.open

  def open_fd(path, flags, *args, **kwargs):
    if flags & writes and not _inside(run_dir, path, kwargs.get('dir_fd')):
      raise PermissionError(f'writing outside the sandbox: {path!r}')
    return os_open(path, flags, *args, **kwargs)

  def open_file(file, mode='r', *args, **kwargs):
    if set(mode) & set('wax+') and not _inside(run_dir, file, None):
      raise PermissionError(f'writing outside the sandbox: {file!r}')
    return io_open(file, mode, *args, **kwargs)

  os.open = open_fd
  builtins.open = io.open = open_file
  for name in ('remove', 'unlink', 'rmdir', 'mkdir', 'mkfifo', 'mknod', 'truncate', 'utime'):
    setattr(os, name, confined(getattr(os, name), f'os.{name}', 0))
  for name in ('chmod', 'chown', 'lchown', 'chflags', 'lchflags', 'lchmod'):
    if hasattr(os, name):
      setattr(os, name, confined(getattr(os, name), f'os.{name}', 0))
  for name in ('rename', 'replace'):
    setattr(os, name, confined(getattr(os, name), f'os.{name}', 0, 1))
  for name in ('link', 'symlink'):
    setattr(os, name, confined(getattr(os, name), f'os.{name}', 1))
  for name in (
    'fork', 'forkpty', 'vfork', 'system', 'popen', 'posix_spawn', 'posix_spawnp', 'kill',
    'killpg', 'setsid', 'setpgid', 'setuid', 'seteuid', 'setreuid', 'setresuid', 'setgid',
    'chroot', 'fchmod', 'fchown', '_exit',
    'execv', 'execve', 'execl', 'execle', 'execlp', 'execlpe', 'execvp', 'execvpe',
    'spawnv', 'spawnve', 'spawnl', 'spawnle', 'spawnlp', 'spawnlpe', 'spawnvp', 'spawnvpe',
  ):  # fmt: skip
    if hasattr(os, name):
      setattr(os, name, disabled(f'os.{name}'))
  subprocess.Popen = disabled('subprocess.Popen')
  _posixsubprocess.fork_exec = disabled('_posixsubprocess.fork_exec')
  for name in ('socket', 'socketpair', 'fromfd', 'create_connection', 'create_server'):
    setattr(socket, name, disabled(f'socket.{name}'))
  _socket.socket = disabled('_socket.socket')
  for name in ('ctypes', '_ctypes', 'resource', 'multiprocessing', 'pty', 'psutil', 'ipdb'):
    sys.modules[name] = None


def _inside(run_dir: str, path, dir_fd: int | None) -> bool:
  if isinstance(path, int):
    return True  # an open descriptor: checked when it was opened
  path = os.fsdecode(path)
  if dir_fd is not None and not os.path.isabs(path):
    path = os.path.join(os.readlink(f'/proc/self/fd/{dir_fd}'), path)
  real = os.path.realpath(path)
  return real == run_dir or real.startswith(run_dir + os.sep)


if __name__ == '__main__':
  _child_main(json.loads(sys.argv[1]))
