"""Avro codec in the Confluent wire format."""

from __future__ import annotations

import io

import fastavro
import pytest

from core.errors import SchemaError
from gateway.envelope import build_event
from ops.traffic import sample_events
from schemas.codec import EVENT_SCHEMA_ID, _plain, event_codec, load_schema
from schemas.flat_avro import compile_encoder

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
    with pytest.raises(SchemaError, match="field 'timestamp': expected an integer"):
        event_codec().encode({**EVENT, "timestamp": "not a number"})


def test_compiled_encoder_is_byte_identical_to_fastavro() -> None:
    fast = compile_encoder(load_schema("event"))
    assert fast is not None
    parsed = fastavro.parse_schema(load_schema("event"))
    messages = sample_events(300, seed=9)
    messages[0]["userId"] = "ünïcødé ✓ " * 20  # multi-byte text, long lengths
    messages[1].pop("userId")
    messages[1]["anonymousId"] = "a"
    for msg in messages:
        event = build_event(msg, "src", 1_700_000_000_000 + len(msg))
        event["timestamp"] = -5 if msg is messages[2] else event["timestamp"]  # negative longs
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, event)
        assert fast(event) == buf.getvalue()


def test_compiled_encoder_reports_the_field() -> None:
    with pytest.raises(SchemaError, match="field 'event_id': expected a string"):
        event_codec().encode({**EVENT, "event_id": 7})
    with pytest.raises(SchemaError, match="field 'source_id': expected a string, got nothing"):
        event_codec().encode({"event_id": "x"})


def test_compiled_decoder_reads_what_fastavro_reads() -> None:
    plain = event_codec(logical_types=False)
    parsed = fastavro.parse_schema(_plain(load_schema("event")))
    messages = sample_events(300, seed=4)
    messages[0]["userId"] = "ünïcødé ✓ " * 20
    for msg in messages:
        data = event_codec().encode(build_event(msg, "src", 1_700_000_000_000))
        expected = fastavro.schemaless_reader(io.BytesIO(data[5:]), parsed, parsed)
        assert plain.decode(data) == expected


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"\x04e1", "truncated"), (b"\x04e1\x02s\x0atrack\x02", "truncated"), (b"\x02\xff", "UTF-8")],
)
def test_compiled_decoder_refuses_broken_bodies(body: bytes, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        event_codec(logical_types=False).decode(b"\x00\x00\x00\x00\x01" + body)
