"""JSON numbers that no later stage can hold: found at the gateway, before anything is produced.

Every stage after the gateway reads the JSON fields with orjson, and the warehouse infers
`Int64` and `Float64` columns from their values. Two kinds of number break that:

- a number that overflows a 64-bit float (`1e999`): orjson refuses the whole text, so a
  record holding one could never be read again;
- an integer outside the signed 64-bit range (the unsigned range 2^63..2^64-1 included):
  it fits no `Int64` column, and beyond 64 bits orjson silently reads it as a float.

Such a number makes its message invalid (see `gateway.envelope`). The general path parses a
body with orjson after replacing each such number by a marker string (`MARK` and the
number's text), so a message holding one is rejected with its index and reason and the
rest of the batch is accepted. The fast path checks the JSON text it keeps (`holdable`)
and steps aside for anything else.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
import orjson

MARK: Final = "\x00sluice-number:"
"""The start of the string that stands for an out-of-range number in a parsed body."""
MARK_JSON: Final = orjson.dumps(MARK)[1:-1]
"""`MARK` as it appears inside JSON text that orjson wrote (the NUL escaped)."""

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
_MAX_DIGITS: Final = 19  # INT64_MAX has 19 digits: a longer integer is out of range
_SHOWN: Final = 40

# Digits become `0` and `E` becomes `e`; `+` goes. After that, an integer part of 19 or
# more digits is a run of 19 zeros and an exponent of three or more digits is `0e000`:
# any number that overflows a double or int64 shows one of them (an integer part under
# 19 digits needs an exponent of at least 290 to overflow). Strings can show them too:
# those texts then get the exact check.
_CLASSES: Final = bytes.maketrans(b"123456789E", b"000000000e")
_LONG_RUN: Final = b"0" * _MAX_DIGITS
_BIG_EXPONENT: Final = b"0e000"
_PLUS: Final = b"+"

# A JSON string (skipped) or a number (group 1), in document order.
_TOKEN: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|(-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)')
_INFINITY: Final = "number is infinity"


def may_overflow(text: bytes) -> bool:
    """False when no number in the JSON `text` can be out of range; True means look closer."""
    classes = text.translate(_CLASSES, _PLUS)
    return _LONG_RUN in classes or _BIG_EXPONENT in classes


def has_long_integer(text: bytes) -> bool:
    """Whether `text` has a run of 19 or more digits (where an int64 overflow would show)."""
    return _LONG_RUN in text.translate(_CLASSES)


def problem(literal: str) -> str:
    """Why the number written `literal` cannot be held (the reason shown to the client)."""
    shown = literal if len(literal) <= _SHOWN else literal[:_SHOWN] + "..."
    if any(c in literal for c in ".eE"):
        return f"number {shown} is out of range (it overflows a 64-bit float)"
    return f"integer {shown} is out of range (it does not fit a signed 64-bit integer)"


def _out_of_range(token: bytes) -> bool:
    if any(c in token for c in b".eE"):
        return float(token) in (float("inf"), float("-inf"))
    digits = len(token) - (token[0] == 0x2D)  # `-`
    if digits > _MAX_DIGITS:
        return True
    return not INT64_MIN <= int(token) <= INT64_MAX


def _marked(raw: bytes) -> bytes:
    """`raw` with every out-of-range number replaced by a JSON string: MARK + its text."""
    out: list[bytes] = []
    last = 0
    for match in _TOKEN.finditer(raw):
        token = match.group(1)
        if token is None or not _out_of_range(token):
            continue
        start, end = match.span()
        shown = token[:_SHOWN] + (b"..." if len(token) > _SHOWN else b"")
        out.extend((raw[last:start], b'"', MARK_JSON, shown, b'"'))
        last = end
    if not out:
        return raw
    out.append(raw[last:])
    return b"".join(out)


def loads(raw: bytes) -> Any:
    """The JSON of a request body; numbers no later stage can hold become marker strings.

    Raises `orjson.JSONDecodeError` for a body that is not JSON, as `orjson.loads` does.
    """
    if not has_long_integer(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if _INFINITY not in str(exc):
                raise
    marked = _marked(raw)
    if marked is raw:
        return orjson.loads(raw)
    try:
        return orjson.loads(marked)
    except orjson.JSONDecodeError:
        # Not JSON for another reason: report it as the client wrote it.
        orjson.loads(raw)
        raise


def marked_reason(value: str) -> str | None:
    """The reason, when `value` is the marker of an out-of-range number; else None."""
    if not value.startswith(MARK):
        return None
    return problem(value[len(MARK) :])


def marked_in(text: str) -> str | None:
    """The reason for the first out-of-range number in JSON `text` orjson wrote, or None."""
    mark = MARK_JSON.decode()
    at = text.find(mark)
    if at < 0:
        return None
    start = at + len(mark)
    end = text.find('"', start)
    return problem(text[start:end])


def holdable(text: bytes) -> bool:
    """Whether every number in the JSON `text` fits a 64-bit float or, if integral, int64.

    The exact check behind `may_overflow`. False also for a text msgspec cannot decode
    (then the general path judges it).
    """
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return False
    return _ints_fit(value)


def _ints_fit(value: Any) -> bool:
    kind = type(value)
    if kind is int:
        return bool(INT64_MIN <= value <= INT64_MAX)
    if kind is dict:
        return all(_ints_fit(v) for v in value.values())
    if kind is list:
        return all(_ints_fit(v) for v in value)
    return True
