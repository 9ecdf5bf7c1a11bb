"""SDK request bodies as typed structs, decoded by msgspec in one pass.

The JSON-object fields (`properties`, `traits`, `context`, `integrations`) stay the raw
JSON text the client sent: the envelope stores them as JSON text, so they need no
decoding and re-encoding. A body that does not fit these types (a boolean userId, a
message that is not an object, invalid JSON) decodes to None and takes the general path.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

_T = TypeVar("_T")

Scalar = str | int | float | None
NULL = msgspec.Raw(b"null")
"""The value of an absent JSON-object field (the same object each time: test with `is`)."""
_NULL = NULL


class Message(msgspec.Struct, gc=False):
    """The fields of an SDK message the envelope uses (the SDKs' camelCase names)."""

    type: str | None = None
    messageId: Scalar = None
    userId: Scalar = None
    anonymousId: Scalar = None
    event: Scalar = None
    name: Scalar = None
    groupId: Scalar = None
    previousId: Scalar = None
    timestamp: Scalar = None
    originalTimestamp: Scalar = None
    sentAt: Scalar | msgspec.UnsetType = msgspec.UNSET
    writeKey: Scalar = None
    properties: msgspec.Raw = _NULL
    traits: msgspec.Raw = _NULL
    context: msgspec.Raw = _NULL
    integrations: msgspec.Raw = _NULL
    # analytics.js adds `_metadata` to every message: named so that it is not "unknown".
    metadata: msgspec.Raw = msgspec.field(default=_NULL, name="_metadata")


class Batch(msgspec.Struct):
    """A `/v1/batch` body."""

    batch: list[Message]
    sentAt: Scalar = None
    writeKey: Scalar = None


_BATCH = msgspec.json.Decoder(Batch)
_SINGLE = msgspec.json.Decoder(Message)


def decode_batch(raw: bytes) -> Batch | None:
    """The body as a batch of well-typed messages, or None (the general path decides)."""
    return _decode(_BATCH, raw)


def decode_single(raw: bytes) -> Message | None:
    """The body as one well-typed message, or None (the general path decides)."""
    return _decode(_SINGLE, raw)


def _decode(decoder: msgspec.json.Decoder[_T], raw: bytes) -> _T | None:
    if not _utf8(raw):
        return None
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def write_key(value: Scalar) -> str | None:
    """A `writeKey` body field as the general path reads it: only a string counts."""
    return value if type(value) is str else None


def _utf8(raw: bytes) -> bool:
    # msgspec validates the strings it decodes but not the raw JSON it keeps.
    if raw.isascii():
        return True
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True
