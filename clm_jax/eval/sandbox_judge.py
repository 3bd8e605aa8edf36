"""The judge: trusted tests in one process, the untrusted program in another.

The program (process U) runs its code, then answers requests over a pipe. The
judge (process J, which never runs untrusted code) runs the trusted test with
the program's entry points bound to `Remote` proxies: a call goes to U, and
what comes back is decoded into plain builtins (None, bool, int, float,
complex, str, bytes, list, tuple, dict, set, frozenset, builtin types) built
here, or else an opaque `Remote` that supports only call, getattr, setattr,
getitem, iteration and len: never ==, !=, hashing by value or truth, which U
could forge. So every comparison the test makes is between values of the
judge's own types, with the judge's own builtins, helpers and modules; an
exception raised in U fails the test even if the test catches it.

The wire format is hand-written, not pickle or marshal: both would build
arbitrary objects, or crash, on bytes that U chooses. A message is a 4-byte
length and a tagged value; the decoder checks every length, tag and type and
builds nothing else.

Standard library only: the sandbox's child imports this module.
"""

import builtins
import os
import struct
import sys

_MAX_MESSAGE = 64 * 1024**2
_MAX_DEPTH = 100
_LENGTH = struct.Struct('<I')
_HANDLE = struct.Struct('<Q')
_FLOAT = struct.Struct('<d')
_COMPLEX = struct.Struct('<dd')
_DETAIL_CHARS = 300
_CONTAINERS = {b'l': list, b't': tuple, b'S': set, b'z': frozenset}
# Builtin types travel by name (MBPP 533 passes `int` to the solution); each
# side maps the name to its own type.
_TYPES = {
  kind.__name__: kind
  for kind in [
    *(bool, bytearray, bytes, complex, dict, float, frozenset),
    *(int, list, object, set, str, tuple, type),
  ]
}
_TAGS = {b'N', b'T', b'F', b'f', b'c', b'h', b'i', b's', b'b', b'y', b'd', *_CONTAINERS}


class ProtocolError(BaseException):
  """U sent bytes that are not a well-formed answer. Not an Exception, as below."""


class RemoteError(BaseException):
  """An exception in U. A BaseException: `except Exception` in a test must not hide it."""


class ProgramEnded(BaseException):
  """U closed its end of the pipe: it exited or was killed."""


# ---------------------------------------------------------------------------
# Wire format


def encode(value, handle_of) -> bytes:
  """`value` as tagged bytes; `handle_of(obj) -> int` names anything not plain."""
  out = bytearray()
  _encode(value, out, handle_of, 0)
  return bytes(out)


def _encode(value, out: bytearray, handle_of, depth: int) -> None:
  if depth > _MAX_DEPTH:
    raise ValueError(f'a value nested more than {_MAX_DEPTH} deep (or referring to itself)')
  if value is None:
    out += b'N'
  elif isinstance(value, type) and _TYPES.get(getattr(value, '__name__', None)) is value:
    raw = value.__name__.encode()
    out += b'y' + _LENGTH.pack(len(raw)) + raw
  elif value is True or value is False:
    out += b'T' if value else b'F'
  elif isinstance(value, int):
    number = int(value)
    raw = number.to_bytes(number.bit_length() // 8 + 1, 'little', signed=True)
    out += b'i' + _LENGTH.pack(len(raw)) + raw
  elif isinstance(value, float):
    out += b'f' + _FLOAT.pack(float(value))
  elif isinstance(value, complex):
    out += b'c' + _COMPLEX.pack(value.real, value.imag)
  elif isinstance(value, str):
    raw = str.encode(value, 'utf-8', 'surrogatepass')
    out += b's' + _LENGTH.pack(len(raw)) + raw
  elif isinstance(value, (bytes, bytearray)):
    out += b'b' + _LENGTH.pack(len(value)) + bytes(value)
  elif isinstance(value, dict):
    items = list(value.items())
    out += b'd' + _LENGTH.pack(len(items))
    for key, item in items:
      _encode(key, out, handle_of, depth + 1)
      _encode(item, out, handle_of, depth + 1)
  elif isinstance(value, (list, tuple, set, frozenset)):
    tag = next(tag for tag, kind in _CONTAINERS.items() if isinstance(value, kind))
    items = list(value)
    out += tag + _LENGTH.pack(len(items))
    for item in items:
      _encode(item, out, handle_of, depth + 1)
  else:
    out += b'h' + _HANDLE.pack(handle_of(value))


def decode(data: bytes, make_handle):
  """The value `encode` wrote, built from builtins and `make_handle(int)` only.

  Raises:
    ProtocolError: The bytes are not exactly one well-formed value.
  """
  try:
    value, end = _decode(memoryview(data), 0, make_handle, 0)
  except (IndexError, struct.error, UnicodeDecodeError, TypeError) as e:
    # TypeError: an unhashable key or set member, e.g. a list.
    raise ProtocolError(f'malformed message: {type(e).__name__}: {e}') from None
  if end != len(data):
    raise ProtocolError(f'{len(data) - end} bytes after the message')
  return value


def _decode(data: memoryview, at: int, make_handle, depth: int):
  if depth > _MAX_DEPTH:
    raise ProtocolError(f'a value nested more than {_MAX_DEPTH} deep')
  tag = bytes(data[at : at + 1])
  at += 1
  if tag not in _TAGS:
    raise ProtocolError(f'unknown tag {tag!r}' if tag else 'the message ends early')
  if tag in (b'N', b'T', b'F'):
    return {b'N': None, b'T': True, b'F': False}[tag], at
  if tag == b'f':
    return _FLOAT.unpack_from(data, at)[0], at + _FLOAT.size
  if tag == b'c':
    return complex(*_COMPLEX.unpack_from(data, at)), at + _COMPLEX.size
  if tag == b'h':
    return make_handle(_HANDLE.unpack_from(data, at)[0]), at + _HANDLE.size
  (count,) = _LENGTH.unpack_from(data, at)
  at += _LENGTH.size
  if tag in (b'i', b's', b'b', b'y'):
    raw = bytes(data[at : at + count])
    if len(raw) != count:
      raise ProtocolError('a value runs past the end of the message')
    if tag == b'i':
      return int.from_bytes(raw, 'little', signed=True), at + count
    if tag == b'y':
      if raw.decode('ascii', 'replace') not in _TYPES:
        raise ProtocolError(f'not a builtin type: {raw[:40]!r}')
      return _TYPES[raw.decode()], at + count
    return (raw.decode('utf-8', 'surrogatepass') if tag == b's' else raw), at + count
  if count > len(data) - at:  # each item takes a byte at least
    raise ProtocolError(f'{count} items cannot fit in the message')
  if tag == b'd':
    pairs = []
    for _ in range(count):
      key, at = _decode(data, at, make_handle, depth + 1)
      item, at = _decode(data, at, make_handle, depth + 1)
      pairs.append((key, item))
    return dict(pairs), at
  items = []
  for _ in range(count):
    item, at = _decode(data, at, make_handle, depth + 1)
    items.append(item)
  return _CONTAINERS[tag](items), at


def send(fd: int, value, handle_of) -> None:
  payload = encode(value, handle_of)
  if len(payload) > _MAX_MESSAGE:
    raise ValueError(f'a message of {len(payload)} bytes, over {_MAX_MESSAGE}')
  view = memoryview(_LENGTH.pack(len(payload)) + payload)
  while view:
    view = view[os.write(fd, view) :]


def receive(fd: int, make_handle):
  """The next message on `fd`.

  Raises:
    ProgramEnded: The other end closed the pipe.
    ProtocolError: The message is too long or malformed.
  """
  (length,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))
  if length > _MAX_MESSAGE:
    raise ProtocolError(f'a message of {length} bytes, over {_MAX_MESSAGE}')
  return decode(_read_exactly(fd, length), make_handle)


def _read_exactly(fd: int, count: int) -> bytes:
  chunks, left = [], count
  while left:
    chunk = os.read(fd, min(left, 1 << 20))
    if not chunk:
      raise ProgramEnded('the program closed its pipe')
    chunks.append(chunk)
    left -= len(chunk)
  return b''.join(chunks)


def summary(e: BaseException) -> str:
  """'Type: message' of an exception, one line, short; its type alone if str() fails."""
  try:
    text = f'{type(e).__name__}: {e}' if str(e) else type(e).__name__
  except BaseException:  # noqa: BLE001 - a hostile __str__
    text = type(e).__name__
  return text.replace('\n', ' ')[:_DETAIL_CHARS]


# ---------------------------------------------------------------------------
# Process U: the program's side


def serve(namespace: dict, requests: int, answers: int) -> None:
  """Answers the judge's requests on the objects of `namespace` until the pipe closes.

  Runs after the untrusted code, in its process: nothing here is trusted by
  the judge, which checks every answer.
  """
  objects = {}

  def handle_of(obj) -> int:
    objects[id(obj)] = obj  # kept alive, so that the id stays its own
    return id(obj)

  while True:
    try:
      request = receive(requests, lambda key: objects[key])
    except ProgramEnded:
      return
    try:
      answer = _answer(request, namespace, objects)
    except StopIteration:
      answer = ('stop',)
    except BaseException as e:  # noqa: BLE001 - every exception is an answer
      answer = ('raise', summary(e))
    try:
      send(answers, answer, handle_of)
    except BaseException as e:  # noqa: BLE001 - e.g. a value that cannot be sent
      send(answers, ('raise', summary(e)), handle_of)


def _answer(request: tuple, namespace: dict, objects: dict) -> tuple:
  op, *args = request
  if op == 'global':
    if args[0] not in namespace:
      raise NameError(f'name {args[0]!r} is not defined')
    return ('ok', namespace[args[0]])
  target = args[0]
  if op == 'call':
    return ('ok', target(*args[1], **args[2]))
  if op == 'getattr':
    return ('ok', getattr(target, args[1]))
  if op == 'setattr':
    setattr(target, args[1], args[2])
    return ('ok', None)
  if op == 'getitem':
    return ('ok', target[args[1]])
  if op == 'iter':
    return ('ok', iter(target))
  if op == 'next':
    return ('ok', next(target))
  if op == 'len':
    try:
      return ('ok', len(target))
    except TypeError:
      return ('nolen',)
  raise ValueError(f'unknown request {op!r}')


# ---------------------------------------------------------------------------
# Process J: the judge's side


# What `Link.ask` returns for U's ('stop',) and ('nolen',): no value U can send is either.
_STOP = object()
_NOLEN = object()


def _kind(message) -> str | None:
  """The kind of a decoded message: a tuple whose first item is a str; else None."""
  if type(message) is tuple and message and type(message[0]) is str:
    return message[0]
  return None


class Link:
  """The judge's end of the pipes to U; remembers the first failure U caused."""

  def __init__(self, requests: int, answers: int):
    self.requests, self.answers = requests, answers
    self.failure = None
    self.started = False  # U's own code said it began the program

  def receive(self):
    try:
      return receive(self.answers, lambda key: Remote(self, key))
    except ProtocolError as e:
      self.failure = self.failure or f'ProtocolError: {e}'
      raise

  def ask(self, *request):
    send(self.requests, request, _handle_of_remote)
    answer = self.receive()
    kind, size = _kind(answer), len(answer) if type(answer) is tuple else 0
    if kind == 'ok' and size == 2:
      return answer[1]
    if kind in ('stop', 'nolen') and size == 1:
      return _STOP if kind == 'stop' else _NOLEN
    if kind == 'raise' and size == 2 and type(answer[1]) is str:
      self.failure = self.failure or answer[1][:_DETAIL_CHARS]
      raise RemoteError(answer[1][:_DETAIL_CHARS])
    self.failure = self.failure or 'ProtocolError: not an answer'
    raise ProtocolError('not an answer')


def _handle_of_remote(value) -> int:
  if isinstance(value, Remote):
    return object.__getattribute__(value, '_remote_key')
  raise TypeError(f'the judge cannot pass a {type(value).__name__} to the program')


class Remote:
  """An object of U: calls, attributes, items, iteration and length go to U."""

  __slots__ = ('_remote_link', '_remote_key')
  __hash__ = object.__hash__  # by identity; equality is refused below

  def __init__(self, link: Link, key: int):
    object.__setattr__(self, '_remote_link', link)
    object.__setattr__(self, '_remote_key', key)

  def _ask(self, op, *args):
    return self._remote_link.ask(op, self, *args)

  def __call__(self, *args, **kwargs):
    return self._ask('call', args, kwargs)

  def __getattr__(self, name):
    if name.startswith('__') and name.endswith('__'):  # protocol probes stay here
      raise AttributeError(name)
    return self._ask('getattr', name)

  def __setattr__(self, name, value):
    self._ask('setattr', name, value)

  def __getitem__(self, key):
    return self._ask('getitem', key)

  def __iter__(self):
    return self._ask('iter')

  def __next__(self):
    item = self._ask('next')
    if item is _STOP:
      raise StopIteration
    return item

  def __len__(self):
    length = self._ask('len')
    if length is _NOLEN:
      raise TypeError('the object has no len()')
    if type(length) is not int or length < 0:
      raise ProtocolError('len() of the object is not a non-negative int')
    return length

  def _refuse(self, *_):
    raise TypeError(
      'the program returned an object that is not a plain value; the judge compares only '
      'None, bool, int, float, complex, str, bytes, list, tuple, dict, set and frozenset'
    )

  __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = _refuse

  def __repr__(self):
    return f'<remote object {self._remote_key:#x}>'


def judge(link: Link, prelude: str, test: str | None, entry_points) -> tuple[str, str]:
  """Runs the trusted test against U; (status, detail), status 'passed', 'failed' or 'error'.

  Once U has begun the program, whatever goes wrong is 'failed': every byte
  read from then on is the program's to choose.

  Args:
    link: The pipes to U, which has run its code (or is running it).
    prelude: Trusted code run first (HumanEval's prompt): its names are the judge's own.
    test: Trusted test code; None: U passes if its code ran to the end.
    entry_points: Names of U's objects that the test uses, bound after the prelude.

  Raises:
    ProgramEnded: U's pipe closed; the caller asks how U ended.
  """
  if _kind(link.receive()) != 'started':
    return 'error', 'the program process did not start'
  link.started = True
  try:
    return _judge(link, prelude, test, entry_points)
  except ProgramEnded:
    raise
  except (RemoteError, ProtocolError):
    return 'failed', link.failure
  except BaseException as e:  # noqa: BLE001 - the test failed, whatever it raised
    return 'failed', summary(e)
  finally:
    try:
      sys.stdout.flush()
    except OSError:
      pass


def _judge(link: Link, prelude: str, test: str | None, entry_points) -> tuple[str, str]:
  ran = link.receive()
  if _kind(ran) == 'raised' and len(ran) == 2 and type(ran[1]) is str:
    return 'failed', ran[1][:_DETAIL_CHARS]
  if _kind(ran) != 'ready':
    return 'failed', 'ProtocolError: the program did not say it ran'
  if test is None:
    return 'passed', ''
  scope = {'__name__': '__main__', '__builtins__': builtins}
  exec(compile(prelude, 'prelude.py', 'exec'), scope)
  for name in entry_points:
    scope[name] = link.ask('global', name)
  exec(compile(test, 'test.py', 'exec'), scope)
  if link.failure is not None:  # the test caught it; U's failure fails it regardless
    return 'failed', link.failure
  return 'passed', ''
