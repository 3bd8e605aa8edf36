"""The sandbox's child: the isolation layers, then the judge (J) and the program (U).

`sandbox` starts this as `python -I -S -B -c BOOTSTRAP`, in a fresh directory
holding the job (limits, uids, the program and its test). Three processes:

  S  this one: reads the job, enters new namespaces (network, mount, pid, IPC;
     as root directly, else inside a user namespace), builds the file system
     view below, then forks J and waits for it.
  J  pid 1 of the new pid namespace: mounts a fresh /proc, reports which
     layers hold, refuses to go on if one is missing (unless allowed), forks U,
     then drops to its own uid and judges (`sandbox_judge.judge`). Only J holds
     the channel to the parent, where it writes the verdict. When J ends, the
     kernel kills everything left in the namespace.
  U  drops to another uid, takes its limits and the Python guard, runs the
     untrusted code and answers J's requests.

The file system view (mount namespace): every mount read-only; empty tmpfs
over /root, /home, /tmp, /var/tmp, /run, /dev/shm and the parent's $HOME, with
only the interpreter's own directories bound back (read-only) where they lie
beneath; a size-limited tmpfs as the run directory, gone with the namespace.

Standard library only (this and `sandbox_judge`): it runs with `-S`, without
site-packages.
"""

import _posixsubprocess
import _socket
import builtins
import contextlib
import ctypes
import io
import json
import os
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import traceback
import types

from clm_jax.eval import sandbox_judge

JOB_FILE = 'job.json'
LAYERS = ('user', 'no_new_privs', 'netns', 'pidns', 'readonly_fs', 'private_dirs', 'proc', 'disk')
EXIT_SETUP = 113
# Covered by an empty tmpfs; home directories too (the parent's $HOME is added).
HIDDEN = ('/root', '/home', '/tmp', '/var/tmp', '/run', '/dev/shm')

# <sched.h>, <sys/mount.h>, <sys/prctl.h>, <linux/capability.h>
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_NAMESPACES = _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
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
_PLAIN_MOUNT = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC

_libc = ctypes.CDLL(None, use_errno=True)


def main() -> None:
  """Process S: isolates, forks J, exits as J did."""
  channel = None
  try:
    with open(JOB_FILE) as f:
      job = json.load(f)
    os.unlink(JOB_FILE)  # the test's source is not the program's to read
    channel = job['channel_fd']
    os.set_inheritable(channel, False)
    report = _isolate(job)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    pid = os.fork()
  except BaseException as e:  # noqa: BLE001 - any setup failure is reported, not raised
    _setup_failed(channel, e)
  if pid == 0:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _judge_process(job, report)  # never returns
  os.close(channel)
  # The parent's SIGTERM on timeout: end J (and with it the namespace) and reap it.
  signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
  status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
  os._exit(status if status >= 0 else 128 - status)


def _setup_failed(channel: int | None, e: BaseException) -> None:
  detail = f'sandbox setup failed: {sandbox_judge.summary(e)}'
  with contextlib.suppress(BaseException):
    traceback.print_exception(e)  # into the output, for whoever debugs the sandbox
  os.write(2, f'\n{detail}\n'.encode())
  if channel is not None:
    with contextlib.suppress(OSError):
      _verdict(channel, 'error', detail)
  os._exit(EXIT_SETUP)


# ---------------------------------------------------------------------------
# Process S: namespaces and the file system view


def _isolate(job: dict) -> dict:
  """Applies the layers that S can; returns which hold (J adds 'proc')."""
  report = dict.fromkeys(LAYERS, False)
  # Before any user namespace: the kernel fixes a new namespace's process limit
  # from the creator's RLIMIT_NPROC. J and U inherit all of them.
  _set_limits(job['limits'])
  as_root = os.geteuid() == 0 and _libc.unshare(_NAMESPACES) == 0
  namespaces = as_root
  uid, gid = os.getuid(), os.getgid()  # before: a new user namespace maps none
  if not namespaces and _libc.unshare(_CLONE_NEWUSER | _NAMESPACES) == 0:
    for name, text in (
      ('setgroups', 'deny'),
      ('uid_map', f'{uid} {uid} 1'),
      ('gid_map', f'{gid} {gid} 1'),
    ):
      with open(f'/proc/self/{name}', 'w') as f:
        f.write(text)
    namespaces = True
  run_dir = os.path.realpath(os.getcwd())
  if namespaces:
    report.update(netns=True, pidns=True)
    report.update(_private_filesystem(job, run_dir))
  if os.geteuid() != 0:
    report['user'] = True  # not root to begin with
  elif as_root or not namespaces:
    # Root's programs get their own uids, if they can still read the interpreter.
    report['user'] = job['uids'] is not None and all(map(_readable_by_anyone, _interpreter()))
  # Else root in a user namespace of its own making, where no other uid is mapped.
  if report['user'] and os.geteuid() == 0:
    os.chown(run_dir, job['uids'][1], job['uids'][1])  # U's alone (its tmpfs, or the host's)
  for cap in range(64):  # the bounding set: no exec may regain a capability
    _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
  report['no_new_privs'] = _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
  # Its fds (the channel) are then out of reach of any process without CAP_SYS_PTRACE.
  _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
  return report


def _interpreter() -> list[str]:
  """The directories the interpreter imports from, none inside another."""
  found = []
  for path in sorted({os.path.realpath(p) for p in sys.path if os.path.isdir(p)}):
    if not any(path.startswith(kept + os.sep) for kept in found):
      found.append(path)
  return found


def _private_filesystem(job: dict, run_dir: str) -> dict:
  """Builds the view of the module docstring; which of its layers took."""
  if not _mount(None, '/', None, _MS_REC | _MS_PRIVATE):
    return {}
  hidden = [
    path
    for path in (*HIDDEN, job['home'])
    if path and os.path.isabs(path) and not os.path.islink(path) and os.path.isdir(path)
  ]
  hidden = [path for path in hidden if not any(_under(p, path) for p in ('/usr', '/etc', '/lib'))]
  # Those inside another are covered with it.
  hidden = [path for path in set(hidden) if not any(_under(path, p) and path != p for p in hidden)]
  # Opened before they are covered: bind mounts take them from these fds.
  keep = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in _interpreter()}
  host_run_dir = os.open(run_dir, os.O_PATH | os.O_DIRECTORY)
  private = True
  for path in hidden:
    private &= _mount(b'tmpfs', path, b'tmpfs', _PLAIN_MOUNT, b'size=1m,nr_inodes=1024,mode=711')
  for path, fd in keep.items():
    if any(_under(path, hide) for hide in hidden):
      os.makedirs(path, mode=0o711, exist_ok=True)
      private &= _mount(f'/proc/self/fd/{fd}'.encode(), path, None, _MS_BIND | _MS_REC)
    os.close(fd)
  os.makedirs(run_dir, mode=0o711, exist_ok=True)
  limits = job['limits']
  options = f'size={limits["disk_bytes"]},nr_inodes={limits["disk_files"]},mode=700'
  disk = _mount(b'tmpfs', run_dir, b'tmpfs', _PLAIN_MOUNT, options.encode())
  # Without a tmpfs, the host's directory itself; a file limit still applies.
  writable = disk or _mount(f'/proc/self/fd/{host_run_dir}'.encode(), run_dir, None, _MS_BIND)
  os.close(host_run_dir)
  os.chdir(run_dir)  # the directory on the new mount, not the one it covers
  return {
    'private_dirs': private,
    'disk': disk,
    'readonly_fs': writable and _readonly_mounts(run_dir),
  }


def _under(path: str, parent: str) -> bool:
  return path == parent or path.startswith(parent.rstrip('/') + '/')


def _mount(source, target: str, fstype, flags: int, data=None) -> bool:
  return _libc.mount(source, target.encode(), fstype, flags, data) == 0


def _readonly_mounts(run_dir: str) -> bool:
  """Makes every mount but `run_dir` read-only; True if all took."""
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
    ok &= _mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | keep)
  return ok


def _unescape(path: str) -> str:
  # mountinfo writes space, tab, newline and backslash as octal escapes.
  return path.encode().decode('unicode_escape').encode('latin-1').decode()


def _readable_by_anyone(path: str) -> bool:
  """Whether a uid that owns nothing can list `path` and reach it from /."""
  mode = os.stat(path).st_mode
  if mode & (stat.S_IROTH | stat.S_IXOTH) != stat.S_IROTH | stat.S_IXOTH:
    return False
  parent = os.path.dirname(path)
  while parent != path:
    if not os.stat(parent).st_mode & stat.S_IXOTH:
      return False
    path, parent = parent, os.path.dirname(parent)
  return True


def _set_limits(limits: dict) -> None:
  for limit, value in (
    (resource.RLIMIT_AS, limits['memory_bytes']),
    (resource.RLIMIT_FSIZE, limits['file_bytes']),
    (resource.RLIMIT_NOFILE, limits['open_files']),
    (resource.RLIMIT_NPROC, limits['processes']),
    (resource.RLIMIT_CORE, 0),
  ):
    resource.setrlimit(limit, (value, value))
  # SIGXCPU at the soft limit, SIGKILL a second later.
  resource.setrlimit(resource.RLIMIT_CPU, (limits['cpu_seconds'], limits['cpu_seconds'] + 1))


# ---------------------------------------------------------------------------
# Process J: the judge


def _judge_process(job: dict, report: dict) -> None:
  channel = job['channel_fd']
  try:
    if report['pidns']:
      report['proc'] = _mount(b'proc', '/proc', b'proc', _PLAIN_MOUNT | _MS_RDONLY)
    os.write(channel, json.dumps(report).encode() + b'\n')
    missing = [layer for layer in LAYERS if not report[layer]]
    if missing and not job['allow_weaker']:
      _verdict(channel, 'error', refusal(missing))
      os._exit(0)
    requests_r, requests_w = os.pipe()
    answers_r, answers_w = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(channel)
      os.close(requests_w)
      os.close(answers_r)
      _program_process(job, report, requests_r, answers_w)  # never returns
    os.close(requests_r)
    os.close(answers_w)
    uids = job['uids']
    _drop_privileges(uids[0] if uids and report['user'] and os.geteuid() == 0 else None)
    os.chdir('/')  # the run directory is U's alone
    # U can neither trace this process (not dumpable, another uid) nor signal it
    # (pid 1 gets only the signals it handles); SIGINT is not one of them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cpu = job['limits']['cpu_seconds']
    signal.signal(signal.SIGXCPU, lambda *_: _out_of_cpu(channel, cpu))
    link = sandbox_judge.Link(requests_w, answers_r)
    program = job['program']
    try:
      status, detail = sandbox_judge.judge(
        link, program['prelude'], program['test'], program['entry_points']
      )
    except sandbox_judge.ProgramEnded:
      status, detail = _how_it_ended(pid, cpu, link)
    _verdict(channel, status, detail)
  except BaseException as e:  # noqa: BLE001 - the judge failing is the sandbox's error
    _verdict(channel, 'error', f'the judge failed: {sandbox_judge.summary(e)}')
  os._exit(0)


def refusal(missing: list[str]) -> str:
  """The reason given for refusing to run without the `missing` layers."""
  return (
    f'sandbox refused to run: no {", ".join(missing)} isolation here; '
    'allow_weaker=True (--allow_weaker_sandbox) runs anyway'
  )


def _verdict(channel: int, status: str, detail: str) -> None:
  os.write(channel, json.dumps({'status': status, 'detail': detail}).encode() + b'\n')


def _out_of_cpu(channel: int, cpu_seconds: int) -> None:
  # Only its own CPU use: U may send this signal too.
  usage = resource.getrusage(resource.RUSAGE_SELF)
  if usage.ru_utime + usage.ru_stime >= cpu_seconds - 0.5:
    _verdict(channel, 'timeout', 'CPU time limit (the test)')
    os._exit(0)


def _how_it_ended(pid: int, cpu_seconds: int, link) -> tuple[str, str]:
  """The verdict once U's pipe closed: how U ended, as its parent sees it."""
  fd = os.pidfd_open(pid)
  try:
    select.select([fd], [], [], 1.0)  # the pipe closes a moment before U is reapable
  finally:
    os.close(fd)
  reaped, status, usage = os.wait4(pid, os.WNOHANG)
  if link.started is False:
    code = os.waitstatus_to_exitcode(status) if reaped else None
    return 'error', f'the program process failed to start (exit code {code})'
  if not reaped:
    return 'failed', 'the program closed its pipe to the judge'
  if os.WIFEXITED(status):
    return 'failed', f'the program exited (code {os.WEXITSTATUS(status)}) before the test ended'
  signum = os.WTERMSIG(status)
  if signum in (signal.SIGXCPU, signal.SIGKILL) and (
    usage.ru_utime + usage.ru_stime >= cpu_seconds - 0.5
  ):
    return 'timeout', 'CPU time limit'
  if signum == signal.SIGKILL:
    return 'failed', 'killed by SIGKILL (memory limit?)'
  return 'failed', f'killed by {signal.Signals(signum).name}'


def _drop_privileges(uid: int | None) -> None:
  if uid is not None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
  # Not dumpable: no ptrace, no /proc/PID/fd or mem, by U or anyone of its uid.
  _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
  # After the uid change, which clears it: if S dies, so does this process.
  _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  _drop_capabilities()


def _drop_capabilities() -> None:
  class Header(ctypes.Structure):
    _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]

  class Data(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ('effective', 'permitted', 'inheritable')]

  if _libc.capset(ctypes.byref(Header(_CAPABILITY_VERSION_3, 0)), (Data * 2)()) != 0:
    raise OSError(ctypes.get_errno(), 'capset')


# ---------------------------------------------------------------------------
# Process U: the program


def _program_process(job: dict, report: dict, requests: int, answers: int) -> None:
  exit_ = os._exit  # before the guard takes it away
  try:
    run_dir = os.getcwd()
    uids = job['uids']
    if uids and report['user'] and os.geteuid() == 0:
      os.setgroups([])
      os.setgid(uids[1])
      os.setuid(uids[1])
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _drop_capabilities()
    main = types.ModuleType('__main__')
    sys.modules['__main__'] = main
    source = job['program']['untrusted']
    _guard(run_dir)
    # From here on anything may be the program's doing (the judge trusts none of it).
    sandbox_judge.send(answers, ('started',), None)
  except BaseException as e:  # noqa: BLE001 - any setup failure is reported, not raised
    os.write(2, f'\nsandbox setup failed: {sandbox_judge.summary(e)}\n'.encode())
    exit_(EXIT_SETUP)
  try:
    exec(compile(source, 'program.py', 'exec'), main.__dict__)
    ran = ('ready',)
  except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail too
    ran = ('raised', sandbox_judge.summary(e))
  with contextlib.suppress(BaseException):
    sys.stdout.flush()
  sandbox_judge.send(answers, ran, None)
  if ran[0] == 'ready':
    sandbox_judge.serve(main.__dict__, requests, answers)
  exit_(0)


def _guard(run_dir: str) -> None:
  """Disables process, network and outside-file functions, as OpenAI human-eval's
  `reliability_guard` does: it stops a model's accidents, not an adversary."""

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
