"""The gateway's fast path: well-formed SDK messages from request bytes to Avro records.

Most requests are SDK batches of well-formed messages. For those, msgspec decodes the
body into typed structs in one pass and leaves `properties`, `traits`, `context` and
`integrations` as the JSON text the client sent (the envelope stores them as JSON
text), and each envelope's Avro body is written field by field, without building a
dict first.

Anything unusual makes the fast path step aside and return None: a message the general
path would reject, a nested field the structs do not name, braces inside plain string
fields, nesting near the depth limit, invalid UTF-8, a number or a time no later stage
can hold, or an event schema that is not the one this writer knows. The request then takes the general path (`gateway.envelope`),
which accepts the same valid messages with the same envelopes and gives invalid ones
their precise reason. The tests hold both paths to the same records.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from core.kafka import Record
from gateway.envelope import EVENT_TYPES, MAX_TIME_MS, MIN_TIME_MS, parse_timestamp
from gateway.errors import InvalidEvent
from gateway.messages import NULL, Message, Scalar
from gateway.numbers import INT64_MAX, INT64_MIN, holdable, may_overflow
from schemas.codec import AvroCodec
from schemas.flat_avro import EVENT_LAYOUT, encode_event, zigzag

_UNSEEN: Final = object()
_OBJECT_FIELDS: Final = 4  # properties, traits, context, integrations; then `_metadata`
_EMPTY: Final = b"{}"


def _text(value: Scalar) -> str | None:
    """A string field as `envelope._opt_str` reads it (numbers become their text)."""
    if value is None or value == "":
        return None
    if type(value) is str:
        return value
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        raise InvalidEvent("integer out of range")  # the general path says it precisely
    return str(value)


_MINUTES: Final[dict[str, int]] = {}
# `SS.mmm` -> milliseconds into the minute, for every valid second and millisecond.
_WITHIN_MINUTE: Final = {
    f"{s:02d}.{ms:03d}": s * 1000 + ms for s in range(60) for ms in range(1000)
}
_UTC_SUFFIXES: Final = ("Z", "+00:00")


def iso_millis(text: str) -> int | None:
    """Epoch ms of `YYYY-MM-DDTHH:MM:SS.fff[fff]` + `Z` or `+00:00`, as SDKs send it.

    The same value `parse_timestamp` gives; None for any other shape (then it decides).
    Date, hour and minute are parsed once and cached (timestamps of one traffic burst
    share them); seconds and milliseconds come from a table.
    """
    within = _WITHIN_MINUTE.get(text[17:23])
    if within is None or text[16:17] != ":":
        return None
    suffix = text[23:]
    if suffix not in _UTC_SUFFIXES:
        # Microseconds: three more digits (truncated, as `parse_timestamp` does).
        micros = suffix[:3]
        if suffix[3:] not in _UTC_SUFFIXES or not (micros.isascii() and micros.isdigit()):
            return None
    prefix = text[:16]
    minute = _MINUTES.get(prefix)
    if minute is None:
        try:
            parsed = datetime.fromisoformat(prefix)
        except ValueError:
            return None
        if parsed.tzinfo is not None or prefix[13] != ":":  # not `…THH:MM`
            return None
        parsed = parsed.replace(tzinfo=UTC)
        if len(_MINUTES) > 4096:
            _MINUTES.clear()
        minute = _MINUTES[prefix] = int(parsed.timestamp()) * 1000
    return minute + within


def layout(schema: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """A record schema's fields as (name, kind), kind like `string`, `long?` (nullable)."""
    return tuple((f["name"], _layout_kind(f["type"])) for f in schema.get("fields", ()))


def _layout_kind(schema: Any) -> str:
    if isinstance(schema, dict):
        return _layout_kind(schema.get("type"))
    if isinstance(schema, list) and len(schema) == 2 and schema[0] == "null":
        return _layout_kind(schema[1]) + "?"
    return str(schema)


class FastWriter:
    """Builds the ingest records of well-formed messages; None means "take the general path"."""

    def __init__(self, codec: AvroCodec, max_event_bytes: int, max_depth: int) -> None:
        self.enabled = layout(codec.schema_json) == EVENT_LAYOUT
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
        request = _Request(source_id, received_at, default_type, batch_sent_at)
        out: list[Record] = []
        kept: list[bytes] = []
        try:
            if batch_sent_at is not None:
                request.millis(batch_sent_at)
            for m in messages:
                objects: list[bytes] = []
                for field in (m.properties, m.traits, m.context, m.integrations, m.metadata):
                    if field is NULL:
                        objects.append(_EMPTY)
                        continue
                    data = bytes(field)
                    if data == b"null":
                        objects.append(_EMPTY)
                        continue
                    if data[0] != 0x7B:  # `{`: these fields are objects
                        return None
                    nested = data.count(b"{") + data.count(b"[")
                    if nested > room:
                        return None
                    expected += nested
                    objects.append(data)
                del objects[_OBJECT_FIELDS:]  # `_metadata` is checked, not kept
                kept.extend(objects)
                record = self._record(m, request, objects)
                if record is None:
                    return None
                out.append(record)
        except InvalidEvent:
            return None
        if raw.count(b"{") + raw.count(b"[") != expected:
            return None
        # The JSON fields are kept as the client wrote them: numbers in them must fit
        # what later stages read (one cheap screen for the request, the exact check
        # only where it sees a long number).
        if may_overflow(b"".join(kept)) and not all(holdable(text) for text in kept):
            return None
        return out

    def _record(  # noqa: PLR0911 - each None: the general path decides
        self, m: Message, request: _Request, objects: list[bytes]
    ) -> Record | None:
        # The checks and values of `envelope.build_event`, in the same order.
        etype = m.type or request.default_type
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
        original = request.millis(m.originalTimestamp or m.timestamp)
        sent_at = request.millis(request.sent_at if m.sentAt is msgspec.UNSET else m.sentAt)
        received_at = request.received_at
        if original is not None and sent_at is not None:
            timestamp = received_at - (sent_at - original)
            if not MIN_TIME_MS <= timestamp <= MAX_TIME_MS:
                return None
        else:
            timestamp = original if original is not None else received_at
        event_id = _text(m.messageId) or str(uuid.uuid4())
        value = encode_event(
            self._header,
            event_id,
            request.source,
            etype,
            name,
            user_id,
            anonymous_id,
            timestamp,
            request.received_at_avro,
            sent_at,
            original,
            objects,
            group_id,
            previous_id,
        )
        if len(value) > self._max_event_bytes:
            return None
        return ((request.prefix + (user_id or anonymous_id or event_id)).encode(), value, None)


class _Request:
    """What all messages of one request share, and the timestamps it already parsed."""

    def __init__(
        self, source_id: str, received_at: int, default_type: str | None, sent_at: Scalar
    ) -> None:
        self.source = source_id.encode()
        self.prefix = source_id + ":"
        self.received_at = received_at
        self.received_at_avro = zigzag(received_at)
        self.default_type = default_type
        self.sent_at = sent_at
        self._times: dict[Scalar, int | None] = {}

    def millis(self, value: Scalar) -> int | None:
        """A timestamp field in epoch ms; raises InvalidEvent as `parse_timestamp` does."""
        # sentAt is usually one text for the whole request: look it up before parsing.
        known = self._times.get(value, _UNSEEN)
        if known is not _UNSEEN:
            return known  # type: ignore[return-value]
        parsed = iso_millis(value) if type(value) is str else None
        if parsed is None:
            parsed = parse_timestamp(value, "timestamp")
        elif not MIN_TIME_MS <= parsed <= MAX_TIME_MS:
            raise InvalidEvent("timestamp out of range")  # the general path says it precisely
        self._times[value] = parsed
        return parsed
