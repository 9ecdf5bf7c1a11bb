"""Turn an SDK message (Segment/RudderStack HTTP API shape) into the Avro event envelope."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from gateway.errors import InvalidEvent
from gateway.numbers import marked_in, marked_reason

EVENT_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias", "webhook"})
_EMPTY = "{}"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
# What the warehouse's DateTime64(3) columns hold (ClickHouse: 1900-01-01 to 2299-12-31).
# A time outside it is refused here: later stages would clamp it, wrap it, or fail.
MIN_TIME_MS = -2_208_988_800_000  # 1900-01-01T00:00:00.000Z
MAX_TIME_MS = 10_413_791_999_999  # 2299-12-31T23:59:59.999Z
TIME_RANGE = "1900-01-01 to 2299-12-31"


def in_time_range(millis: int) -> bool:
    """Whether epoch milliseconds `millis` lie in the years the warehouse can hold."""
    return MIN_TIME_MS <= millis <= MAX_TIME_MS


def parse_timestamp(value: Any, field: str) -> int | None:
    """Epoch milliseconds from an ISO-8601 string (or a number of ms); None when absent.

    Raises InvalidEvent for anything else, and for a time outside `TIME_RANGE`.
    """
    if value is None or value == "":
        return None
    millis = _millis(value, field)
    if not in_time_range(millis):
        raise InvalidEvent(f"{field} is outside the supported dates ({TIME_RANGE})")
    return millis


def _millis(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise InvalidEvent(f"{field} must be an ISO-8601 timestamp")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if not isinstance(value, str):
        raise InvalidEvent(f"{field} must be an ISO-8601 timestamp")
    number = marked_reason(value)
    if number is not None:
        raise InvalidEvent(f"{field}: {number}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidEvent(f"{field} is not an ISO-8601 timestamp: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        # SDKs send UTC; a timestamp without an offset is read as UTC, as Segment does.
        parsed = parsed.replace(tzinfo=UTC)
    # Exact integer arithmetic: `timestamp() * 1000` can land a millisecond short.
    millis: int = (parsed - _EPOCH) // _MILLISECOND
    return millis


def _cached(times: dict[Any, int | None], raw: Any, field: str) -> int | None:
    if type(raw) is not str:
        return parse_timestamp(raw, field)
    if raw in times:
        return times[raw]
    parsed = times[raw] = parse_timestamp(raw, field)
    return parsed


def _obj(msg: dict[str, Any], field: str) -> str:
    value = msg.get(field)
    if value is None:
        return _EMPTY
    if not isinstance(value, dict):
        raise InvalidEvent(f"{field} must be an object")
    if not value:
        return _EMPTY
    text = orjson.dumps(value).decode()
    number = marked_in(text)
    if number is not None:
        raise InvalidEvent(f"{field}: {number}")
    return text


def _opt_str(msg: dict[str, Any], field: str) -> str | None:
    value = msg.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        number = marked_reason(value)
        if number is not None:
            raise InvalidEvent(f"{field}: {number}")
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise InvalidEvent(f"{field} must be a string")


def build_event(
    msg: Any,
    source_id: str,
    received_at_ms: int,
    default_type: str | None = None,
    times: dict[Any, int | None] | None = None,
) -> dict[str, Any]:
    """Validate one message and build its envelope record; InvalidEvent says why not.

    The event time is corrected for client clock skew the way Segment and RudderStack
    do it: ``timestamp = receivedAt - (sentAt - originalTimestamp)``. Every time, the
    corrected one included, must lie in `TIME_RANGE`; a number no later stage can hold
    (see `gateway.numbers`) in any field the envelope keeps makes the message invalid.
    """
    if not isinstance(msg, dict):
        raise InvalidEvent("an event must be a JSON object")
    etype = msg.get("type") or default_type
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        raise InvalidEvent(f"type must be one of {', '.join(sorted(EVENT_TYPES))}")
    user_id = _opt_str(msg, "userId")
    anonymous_id = _opt_str(msg, "anonymousId")
    if user_id is None and anonymous_id is None and etype != "webhook":
        raise InvalidEvent("userId or anonymousId is required")
    name = _opt_str(msg, "event") if etype == "track" else _opt_str(msg, "name")
    if etype == "track" and not name:
        raise InvalidEvent("track events need an event name")
    group_id = _opt_str(msg, "groupId")
    if etype == "group" and not group_id:
        raise InvalidEvent("group events need a groupId")
    previous_id = _opt_str(msg, "previousId")
    if etype == "alias" and not previous_id:
        raise InvalidEvent("alias events need a previousId")
    original_raw = msg.get("originalTimestamp") or msg.get("timestamp")
    sent_raw = msg.get("sentAt")
    if times is None:
        original = parse_timestamp(original_raw, "timestamp")
        sent_at = parse_timestamp(sent_raw, "sentAt")
    else:
        # One request's messages share sentAt and often timestamps: parse each text once.
        original = _cached(times, original_raw, "timestamp")
        sent_at = _cached(times, sent_raw, "sentAt")
    if original is not None and sent_at is not None:
        timestamp = received_at_ms - (sent_at - original)
        if not in_time_range(timestamp):
            raise InvalidEvent(
                "timestamp corrected for clock skew (receivedAt - (sentAt - timestamp))"
                f" is outside the supported dates ({TIME_RANGE})"
            )
    else:
        timestamp = original if original is not None else received_at_ms
    message_id = _opt_str(msg, "messageId")
    return {
        "event_id": message_id or str(uuid.uuid4()),
        "source_id": source_id,
        "type": etype,
        "event": name,
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "timestamp": timestamp,
        "received_at": received_at_ms,
        "sent_at": sent_at,
        "original_timestamp": original,
        "properties": _obj(msg, "properties"),
        "traits": _obj(msg, "traits"),
        "context": _obj(msg, "context"),
        "integrations": _obj(msg, "integrations"),
        "group_id": group_id,
        "previous_id": previous_id,
    }


def partition_key(event: dict[str, Any]) -> bytes:
    """`source_id:user` so that one user's events stay in order on one partition."""
    user = event["user_id"] or event["anonymous_id"] or event["event_id"]
    return f"{event['source_id']}:{user}".encode()
