"""The gateway's message validation and envelope building."""

from __future__ import annotations

import re

import pytest

from gateway.envelope import build_event, parse_timestamp, partition_key
from gateway.errors import InvalidEvent
from gateway.numbers import loads
from schemas.codec import event_codec

RECEIVED = 1_700_000_010_000


def test_track_event_is_skew_corrected_and_keyed_by_user() -> None:
    msg = {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "messageId": "m-1",
        "timestamp": "2023-11-14T22:13:20.000Z",  # 1_700_000_000_000
        "sentAt": "2023-11-14T22:13:25.000Z",  # client clock: sent 5 s after the event
        "properties": {"total": 12.5},
    }
    event = build_event(msg, "web", RECEIVED)
    assert event["event_id"] == "m-1"
    assert event["timestamp"] == RECEIVED - 5000
    assert event["original_timestamp"] == 1_700_000_000_000
    assert event["properties"] == '{"total":12.5}'
    assert partition_key(event) == b"web:u1"
    assert event_codec().decode(event_codec().encode(event))["event"] == "Order Completed"


def test_default_type_from_route_and_generated_id() -> None:
    event = build_event({"anonymousId": "a1", "name": "Home"}, "web", RECEIVED, "page")
    assert event["type"] == "page"
    assert event["event"] == "Home"
    assert len(event["event_id"]) == 36
    assert event["timestamp"] == RECEIVED
    assert partition_key(event) == b"web:a1"


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        ([], "JSON object"),
        ({"type": "nope", "userId": "u"}, "type must be"),
        ({"type": [None], "userId": "u"}, "type must be"),
        ({"type": "track", "event": "x"}, "userId or anonymousId"),
        ({"type": "track", "userId": "u"}, "event name"),
        ({"type": "group", "userId": "u"}, "groupId"),
        ({"type": "alias", "userId": "u"}, "previousId"),
        ({"type": "identify", "userId": "u", "traits": [1]}, "traits must be an object"),
        ({"type": "identify", "userId": "u", "timestamp": "yesterday"}, "ISO-8601"),
        ({"type": "identify", "userId": {"a": 1}}, "userId must be a string"),
    ],
)
def test_invalid_messages_say_why(msg: object, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        build_event(msg, "web", RECEIVED)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (b'"timestamp": "1899-12-31T23:59:59.999Z"', "timestamp is outside the supported dates"),
        (b'"timestamp": "2300-01-01T00:00:00Z"', "timestamp is outside"),
        (b'"timestamp": -1e20', "timestamp is outside"),
        (b'"timestamp": 100000000000000000', "timestamp is outside"),
        (b'"sentAt": "0001-01-01T00:00:00Z"', "sentAt is outside"),
        (
            b'"timestamp": "2299-12-31T00:00:00Z", "sentAt": "1900-01-02T00:00:00Z"',
            "corrected for clock skew",
        ),
        (b'"properties": {"n": 9223372036854775808}', "properties: integer 9223372036854775808"),
        (b'"traits": {"n": [-9223372036854775809]}', "traits: integer"),
        (b'"context": {"n": 1e999}', "context: number 1e999 is out of range"),
        (b'"anonymousId": 123456789012345678901234567890', "anonymousId: integer"),
    ],
)
def test_times_and_numbers_later_stages_cannot_hold_are_invalid(extra: bytes, reason: str) -> None:
    # Parsed as the gateway parses a body: out-of-range numbers become markers.
    msg = loads(b'{"type": "identify", "userId": "u", ' + extra + b"}")
    with pytest.raises(InvalidEvent, match=re.escape(reason)):
        build_event(msg, "web", RECEIVED)


def test_the_edges_of_the_supported_dates_are_valid() -> None:
    for text in ("1900-01-01T00:00:00.000Z", "2299-12-31T23:59:59.999Z"):
        event = build_event({"type": "identify", "userId": "u", "timestamp": text}, "web", 0)
        assert event["timestamp"] == parse_timestamp(text, "timestamp")
