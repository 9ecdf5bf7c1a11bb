"""Avro codec in the Confluent wire format."""

from __future__ import annotations

import pytest

from schemas.codec import EVENT_SCHEMA_ID, event_codec
from schemas.errors import SchemaError

EVENT = {
    "event_id": "e1",
    "source_id": "s",
    "type": "track",
    "event": "x",
    "timestamp": 1_700_000_000_000,
    "received_at": 1_700_000_000_001,
}


def test_round_trip_carries_the_confluent_header() -> None:
    codec = event_codec()
    data = codec.encode(EVENT)
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == EVENT_SCHEMA_ID
    decoded = codec.decode(data)
    assert decoded["event_id"] == "e1"
    assert decoded["properties"] == "{}"
    assert int(decoded["timestamp"].timestamp() * 1000) == 1_700_000_000_000


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x00\x00\x01abc", "magic byte"),
        (b"\x00" + (777).to_bytes(4, "big") + b"abc", "unknown schema id 777"),
        (b"\x00\x00\x00\x00\x01\x08ab", "does not decode"),
    ],
)
def test_bad_frames_are_schema_errors(data: bytes, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        event_codec().decode(data)


def test_record_that_does_not_fit_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="does not match"):
        event_codec().encode({**EVENT, "timestamp": "not a number"})
