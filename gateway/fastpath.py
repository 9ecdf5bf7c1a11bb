"""The gateway's fast path: well-formed SDK messages from request bytes to Avro records.

Most requests are SDK batches of well-formed messages. For those, msgspec decodes the
body into typed structs in one pass and leaves `properties`, `traits`, `context` and
`integrations` as the JSON text the client sent (the envelope stores them as JSON
text), and each envelope's Avro body is written field by field, without building a
dict first.

Anything unusual makes the fast path step aside and return None: a message the general
path would reject, a nested field the structs do not name, braces inside plain string
fields, nesting near the depth limit, invalid UTF-8, or an event schema that is not the
one this writer knows. The request then takes the general path (`gateway.envelope`),
which accepts the same valid messages with the same envelopes and gives invalid ones
their precise reason. The tests hold both paths to the same records.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

from gateway.envelope import EVENT_TYPES, InvalidEvent, parse_timestamp
from gateway.messages import NULL, Message, Scalar
from ops.producer import Record
from schemas.codec import AvroCodec
from schemas.fastpath import zigzag

# The envelope layout this writer produces, in schema order; see `_layout`.
_LAYOUT = (
    ("event_id", "string"),
    ("source_id", "string"),
    ("type", "string"),
    ("event", "string?"),
    ("user_id", "string?"),
    ("anonymous_id", "string?"),
    ("timestamp", "long"),
    ("received_at", "long"),
    ("sent_at", "long?"),
    ("original_timestamp", "long?"),
    ("properties", "string"),
    ("traits", "string"),
    ("context", "string"),
    ("integrations", "string"),
    ("group_id", "string?"),
    ("previous_id", "string?"),
)


def _kind(schema: Any) -> str:
    if isinstance(schema, dict):
        return _kind(schema.get("type"))
    if isinstance(schema, list) and len(schema) == 2 and schema[0] == "null":
        return _kind(schema[1]) + "?"
    return str(schema)


def _layout(schema: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((f["name"], _kind(f["type"])) for f in schema.get("fields", ()))


_ABSENT = b"\x00"  # union branch 0: null
_PRESENT = b"\x02"  # union branch 1
_EMPTY_OBJECT = zigzag(2) + b"{}"
_OPENERS = (b"{", b"[")


def _text(value: Scalar) -> str | None:
    """A string field as `envelope._opt_str` reads it (numbers become their text)."""
    if value is None or value == "":
        return None
    if type(value) is str:
        return value
    return str(value)


def _opt_string(text: str | None) -> bytes:
    if text is None:
        return _ABSENT
    data = text.encode()
    return _PRESENT + zigzag(len(data)) + data


def _string(text: str) -> bytes:
    data = text.encode()
    return zigzag(len(data)) + data


def _opt_long(value: int | None) -> bytes:
    return _ABSENT if value is None else _PRESENT + zigzag(value)


_MINUTES: dict[str, int] = {}


def iso_millis(text: str) -> int | None:  # noqa: PLR0911 - each None: another shape
    """Epoch ms of `YYYY-MM-DDTHH:MM:SS.fff[fff]` + `Z` or `+00:00`, as SDKs send it.

    The same value `parse_timestamp` gives; None for any other shape (then it decides).
    The date, hour and minute are parsed once and cached: timestamps of one traffic
    burst share them.
    """
    size = len(text)
    if text[-1:] == "Z":
        end = size - 1
    elif text.endswith("+00:00"):
        end = size - 6
    else:
        return None
    if end not in (23, 26) or text[16] != ":" or text[19] != ".":
        return None
    seconds, millis = text[17:19], text[20:23]
    if not (seconds.isascii() and seconds.isdigit() and millis.isascii() and millis.isdigit()):
        return None
    if end == 26 and not (text[23:26].isascii() and text[23:26].isdigit()):
        return None
    second = int(seconds)
    if second > 59:
        return None
    prefix = text[:16]
    minute = _MINUTES.get(prefix)
    if minute is None:
        try:
            parsed = datetime.fromisoformat(prefix).replace(tzinfo=UTC)
        except ValueError:
            return None
        if len(_MINUTES) > 4096:
            _MINUTES.clear()
        minute = _MINUTES[prefix] = int(parsed.timestamp()) * 1000
    return minute + second * 1000 + int(millis)


def _millis(value: Scalar, times: dict[Scalar, int | None]) -> int | None:
    """A timestamp field in epoch ms; raises InvalidEvent as `parse_timestamp` does."""
    if type(value) is str:
        fast = iso_millis(value)
        if fast is not None:
            return fast
    if value in times:
        return times[value]
    parsed = times[value] = parse_timestamp(value, "timestamp")
    return parsed


class FastWriter:
    """Builds the ingest records of well-formed messages; None means "take the general path"."""

    def __init__(self, codec: AvroCodec, max_event_bytes: int, max_depth: int) -> None:
        self.enabled = _layout(codec.schema_json) == _LAYOUT
        self._header = codec.header
        self._max_event_bytes = max_event_bytes
        self._max_depth = max_depth

    def records(  # noqa: PLR0911 - each None: the general path decides
        self,
        raw: bytes,
        messages: list[Message],
        source_id: str,
        received_at: int,
        default_type: str | None = None,
        batch_sent_at: Scalar = None,
    ) -> list[Record] | None:
        """Records for `messages` decoded from the body `raw`, or None for the general path.

        `default_type` is set for single-message bodies (the route's type) and None for
        batches; `batch_sent_at` is a batch's own `sentAt`, used by messages without one.
        """
        if not self.enabled:
            return None
        # Where a message's JSON fields start: the body, the batch array and the message
        # for a batch; the message itself for a single-message body.
        levels = 1 if default_type is not None else 3
        # Every `{` or `[` of the body must belong to the structure or to a message's
        # JSON fields. Anything else (an unknown nested field, braces in a plain string)
        # is left to the general path, which measures the nesting depth precisely.
        expected = 1 if levels == 1 else 2 + len(messages)
        room = self._max_depth - levels
        times: dict[Scalar, int | None] = {}
        source = _string(source_id)
        prefix = source_id + ":"
        out: list[Record] = []
        try:
            if batch_sent_at is not None:
                _millis(batch_sent_at, times)
            for m in messages:
                objects: list[bytes] = []
                for field in (m.properties, m.traits, m.context, m.integrations, m.metadata):
                    if field is NULL:
                        objects.append(_EMPTY_OBJECT)
                        continue
                    data = bytes(field)
                    if data == b"null":
                        objects.append(_EMPTY_OBJECT)
                        continue
                    if data[0] != 0x7B:  # `{`: these fields are objects
                        return None
                    nested = data.count(b"{") + data.count(b"[")
                    if nested > room:
                        return None
                    expected += nested
                    objects.append(_EMPTY_OBJECT if data == b"{}" else zigzag(len(data)) + data)
                record = self._record(
                    m, source, prefix, received_at, default_type, batch_sent_at, times, objects
                )
                if record is None:
                    return None
                out.append(record)
        except InvalidEvent:
            return None
        if raw.count(b"{") + raw.count(b"[") != expected:
            return None
        return out

    def _record(  # noqa: PLR0911 - each None: the general path decides
        self,
        m: Message,
        source: bytes,
        prefix: str,
        received_at: int,
        default_type: str | None,
        batch_sent_at: Scalar,
        times: dict[Scalar, int | None],
        objects: list[bytes],
    ) -> Record | None:
        # The checks and values of `envelope.build_event`, in the same order.
        etype = m.type or default_type
        if etype not in EVENT_TYPES:
            return None
        user_id = _text(m.userId)
        anonymous_id = _text(m.anonymousId)
        if user_id is None and anonymous_id is None and etype != "webhook":
            return None
        if etype == "track":
            name = _text(m.event)
            if not name:
                return None
        else:
            name = _text(m.name)
        group_id = _text(m.groupId)
        if etype == "group" and not group_id:
            return None
        previous_id = _text(m.previousId)
        if etype == "alias" and not previous_id:
            return None
        original = _millis(m.originalTimestamp or m.timestamp, times)
        sent_raw = batch_sent_at if m.sentAt is msgspec.UNSET else m.sentAt
        sent_at = _millis(sent_raw, times)
        if original is not None and sent_at is not None:
            timestamp = received_at - (sent_at - original)
        else:
            timestamp = original if original is not None else received_at
        event_id = _text(m.messageId) or str(uuid.uuid4())
        value = b"".join(
            (
                self._header,
                _string(event_id),
                source,
                _string(etype),
                _opt_string(name),
                _opt_string(user_id),
                _opt_string(anonymous_id),
                zigzag(timestamp),
                zigzag(received_at),
                _opt_long(sent_at),
                _opt_long(original),
                objects[0],
                objects[1],
                objects[2],
                objects[3],
                _opt_string(group_id),
                _opt_string(previous_id),
            )
        )
        if len(value) > self._max_event_bytes:
            return None
        return ((prefix + (user_id or anonymous_id or event_id)).encode(), value, None)
