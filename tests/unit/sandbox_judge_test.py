"""The judge's wire format: plain values come back as the judge's own builtins, anything else is refused."""

import collections
import enum
import math
import struct

import pytest

from clm_jax.eval import sandbox_judge


class _Loud(enum.IntEnum):
  ONE = 1


class _Str(str):
  def __eq__(self, other):
    return True

  __hash__ = str.__hash__


_Point = collections.namedtuple('_Point', 'x y')


def _no_handles(value):
  raise AssertionError(f'asked for a handle of {value!r}')


def _round_trip(value):
  return sandbox_judge.decode(sandbox_judge.encode(value, _no_handles), _no_handles)


@pytest.mark.parametrize(
  'value',
  [
    None,
    True,
    False,
    0,
    -1,
    255,
    -(2**200) + 7,
    0.1,
    -0.0,
    math.inf,
    complex(1.5, -2),
    '',
    'snow ☃ \udcff',
    b'\x00\xff',
    [1, [2, [3, 'x']], ()],
    (1,),
    {'a': [1], (1, 'b'): {2: None}},
    {1, 'x', (2, 3)},
    frozenset({frozenset({1})}),
    [int, str, float, tuple, type],
  ],
)
def test_plain_values_come_back_equal_and_of_the_same_type(value):
  back = _round_trip(value)
  assert back == value
  assert repr(back) == repr(value)  # same types all the way down: repr shows them


def test_an_int_past_the_digit_limit_comes_back():
  # Sent as bytes, not digits: int('...') stops at 4,300 of them.
  assert _round_trip(10**5000 + 3) - 10**5000 == 3


def test_subclasses_come_back_as_their_builtin():
  assert type(_round_trip(_Loud.ONE)) is int
  assert type(_round_trip(collections.Counter('aab'))) is dict
  assert _round_trip(collections.Counter('aab')) == {'a': 2, 'b': 1}
  assert type(_round_trip(_Point(1, 2))) is tuple
  forged = _round_trip(_Str('wrong'))
  assert type(forged) is str and forged != 'right'


def test_nan_and_negative_zero_keep_their_bits():
  assert math.isnan(_round_trip(math.nan))
  assert math.copysign(1, _round_trip(-0.0)) == -1


def test_anything_else_is_a_handle():
  class Thing:
    pass

  thing = Thing()
  keys = {}
  data = sandbox_judge.encode([thing, 1], lambda obj: keys.setdefault(id(obj), 41))
  assert keys == {id(thing): 41}
  assert sandbox_judge.decode(data, lambda key: ('handle', key)) == [('handle', 41), 1]


def _int_message(length: int, raw: bytes) -> bytes:
  return b'i' + struct.pack('<I', length) + raw


@pytest.mark.parametrize(
  'data, message',
  [
    (b'', 'ends early'),
    (b'Q', 'unknown tag'),
    (b'NN', '1 bytes after the message'),
    (_int_message(4, b'\x01'), 'runs past the end'),
    (b's' + struct.pack('<I', 1) + b'\xff', 'UnicodeDecodeError'),
    (b'y' + struct.pack('<I', 4) + b'eval', 'not a builtin type'),
    (b'l' + struct.pack('<I', 10**9) + b'N', 'cannot fit'),
    (b'd' + struct.pack('<I', 1) + b'l' + struct.pack('<I', 0) + b'N', 'unhashable'),
    (b'l' + struct.pack('<I', 1) + b'l', 'malformed'),
    (b'l\x01\x00\x00\x00' * 150 + b'N', 'nested more than 100 deep'),
  ],
)
def test_malformed_messages_are_refused(data, message):
  with pytest.raises(sandbox_judge.ProtocolError, match=message):
    sandbox_judge.decode(data, _no_handles)


def test_a_value_referring_to_itself_is_not_sent():
  loop = []
  loop.append(loop)
  with pytest.raises(ValueError, match='referring to itself'):
    sandbox_judge.encode(loop, _no_handles)


def test_a_remote_object_is_never_equal_nor_true():
  remote = sandbox_judge.Remote(link=None, key=7)
  for compare in (
    lambda: remote == 1,
    lambda: remote != 1,
    lambda: 1 == remote,  # noqa: SIM300 - the reflected comparison is the point
    lambda: remote < 1,
    lambda: bool(remote),
    lambda: [remote] == [1],
  ):
    with pytest.raises(TypeError, match='not a plain value'):
      compare()
  assert {remote: 1}[remote] == 1  # hashable by identity
  assert remote in [remote]  # identity first, as for any object
