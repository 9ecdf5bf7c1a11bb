"""The gateway's fast path gives exactly the general path's records, or steps aside."""

from __future__ import annotations

import importlib
import importlib.util
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

import gateway.fast_envelope
from gateway.envelope import (
    MAX_TIME_MS,
    MIN_TIME_MS,
    build_event,
    in_time_range,
    parse_timestamp,
    partition_key,
)
from gateway.errors import InvalidEvent
from gateway.fast_envelope import FastWriter, iso_millis
from gateway.messages import decode_batch, decode_single
from gateway.numbers import holdable, loads
from ops.traffic import sample_events
from schemas.codec import event_codec

RECEIVED = 1_795_389_209_123
CODEC = event_codec()
JSON_FIELDS = ("properties", "traits", "context", "integrations")


def _general(body: dict[str, Any], source: str = "web") -> list[tuple[bytes, dict[str, Any]]]:
    """What the general path makes of a batch body: (key, decoded envelope) per message."""
    sent_at = body.get("sentAt")
    out = []
    times: dict[Any, int | None] = {}
    for msg in body["batch"]:
        if sent_at is not None and "sentAt" not in msg:
            msg = {**msg, "sentAt": sent_at}  # noqa: PLW2901 - as handle_batch does
        event = build_event(msg, source, RECEIVED, None, times)
        out.append((partition_key(event), CODEC.decode(CODEC.encode(event))))
    return out


def _fast(
    raw: bytes, writer: Any = None, source: str = "web"
) -> list[tuple[bytes, dict[str, Any]]] | None:
    decoded = decode_batch(raw)
    assert decoded is not None, "the body should decode"
    writer = writer or FastWriter(CODEC, 32 * 1024, 32)
    records = writer.records(raw, decoded.batch, source, RECEIVED, batch_sent_at=decoded.sentAt)
    if records is None:
        return None
    return [(key, CODEC.decode(value)) for key, value, _ in records]


def _comparable(records: list[tuple[bytes, dict[str, Any]]]) -> list[Any]:
    # The fast path keeps the client's JSON text of object fields: compare them parsed.
    return [
        (key, {k: orjson.loads(v) if k in JSON_FIELDS else v for k, v in event.items()})
        for key, event in records
    ]


VARIANTS: list[dict[str, Any]] = [
    {"type": "track", "event": "Signed Up", "userId": 42, "timestamp": "2026-02-28T23:59:59.999Z"},
    {"type": "track", "event": "Paid", "anonymousId": "a-1", "properties": {"amount": 1.5}},
    {"type": "identify", "userId": "u-1", "traits": {"email": "x@example.com", "tags": ["a"]}},
    {"type": "page", "userId": "u-2", "name": "Pricing", "timestamp": 1_795_000_000_000},
    {"type": "screen", "userId": "u-3", "name": "Home", "sentAt": None},
    {"type": "group", "userId": "u-4", "groupId": "g-1", "traits": {}},
    {"type": "alias", "userId": "u-5", "previousId": "anon-9", "integrations": {"All": True}},
    {"type": "track", "event": "Café ☕", "userId": "ü-6", "properties": {"emoji": "😀"}},
    {
        "type": "track",
        "event": "Skewed",
        "userId": "u-7",
        "originalTimestamp": "2026-11-22T10:00:00.123456+00:00",
        "sentAt": "2026-11-22T10:00:05.000+00:00",
    },
    {"type": "track", "event": "Offset", "userId": "u-8", "timestamp": "2026-11-22T12:00:00+02:00"},
    {"type": "track", "event": "Old", "userId": "u-9", "timestamp": "1969-12-31T23:59:59.999Z"},
    {"type": "track", "event": "Meta", "userId": "u-10", "_metadata": {"bundled": ["Segment.io"]}},
    {"type": "track", "event": "Extra", "userId": "u-11", "channel": "web", "rudderId": "r"},
    {"type": "track", "event": "Empty", "userId": "", "anonymousId": "a-12", "messageId": ""},
]


def _with_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"messageId": f"m-{i}", **m} if "messageId" not in m else m for i, m in enumerate(messages)
    ]


@pytest.mark.parametrize("sent_at", [None, "2026-11-22T10:00:09.500Z"])
def test_same_records_as_the_general_path(sent_at: str | None) -> None:
    messages = _with_ids(VARIANTS[:-1]) + sample_events(200, users=30, seed=7)
    body: dict[str, Any] = {"batch": messages}
    if sent_at:
        body["sentAt"] = sent_at
    fast = _fast(orjson.dumps(body))
    assert fast is not None
    assert _comparable(fast) == _comparable(_general(body))


def test_whitespace_and_generated_ids() -> None:
    raw = (
        b'{ "batch" : [ { "type" : "track", "event": "Spaced", "userId": "u",\n'
        b'  "properties" : { "a" : [ 1, 2 ], "b" : { } } },\n'
        b'  {"type": "identify", "anonymousId": "a", "traits": null} ] }'
    )
    fast = _fast(raw)
    assert fast is not None
    (key1, first), (key2, second) = fast
    assert first["properties"] == '{ "a" : [ 1, 2 ], "b" : { } }'
    assert orjson.loads(first["properties"]) == {"a": [1, 2], "b": {}}
    assert second["traits"] == "{}"
    assert key1 == b"web:u"
    assert key2 == b"web:a"
    assert len({first["event_id"], second["event_id"]}) == 2
    assert all(len(e["event_id"]) == 36 for _, e in fast)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "nope", "userId": "u"},
        {"type": "track", "event": "x"},
        {"type": "track", "userId": "u"},
        {"type": "group", "userId": "u"},
        {"type": "alias", "userId": "u"},
        {"type": "identify", "userId": "u", "traits": [1]},
        {"type": "identify", "userId": "u", "properties": "text"},
        {"type": "identify", "userId": "u", "timestamp": "yesterday"},
        {"type": "track", "event": "{braces}", "userId": "u"},
        {"type": "track", "event": "x", "userId": "u", "unknown": {"nested": 1}},
        {"type": "track", "event": "x", "userId": "u", "properties": {"big": "x" * 40_000}},
        {"type": "track", "event": "x", "userId": "u", "properties": {"a": [[[[[[[[[[1]]]]]]]]]]}},
    ],
)
def test_steps_aside_for_anything_the_general_path_must_judge(message: dict[str, Any]) -> None:
    raw = orjson.dumps({"batch": [{"type": "track", "event": "ok", "userId": "u"}, message]})
    assert _fast(raw, FastWriter(CODEC, 32 * 1024, 12)) is None


def test_steps_aside_for_a_bad_batch_sent_at() -> None:
    assert _fast(b'{"batch": [], "sentAt": "soon"}') is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"batch": [{"type": "track", "userId": true}]}',
        b'{"batch": [[]]}',
        b'{"batch": {}}',
        b'{"batch": [{"type": "track", "properties": {"s": "\xff"}}]}',
        b'{"batch": [{"type": "track", "properties": {"s": "\\ud800"}}]}',
        b'{"batch": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
        b"not json",
    ],
)
def test_bodies_that_do_not_fit_the_structs_decode_to_none(raw: bytes) -> None:
    assert decode_batch(raw) is None


def test_single_message_bodies() -> None:
    raw = b'{"userId": 7, "event": "Clicked", "writeKey": "k", "properties": {"x": 1}}'
    decoded = decode_single(raw)
    assert decoded is not None
    assert decoded.writeKey == "k"
    records = FastWriter(CODEC, 32 * 1024, 32).records(
        raw, [decoded], "web", RECEIVED, default_type="track"
    )
    assert records is not None
    (key, value, headers) = records[0]
    assert value is not None
    event = CODEC.decode(value)
    assert (key, headers, event["type"], event["user_id"]) == (b"web:7", None, "track", "7")
    assert event["properties"] == '{"x": 1}'


def test_a_schema_it_does_not_know_disables_it() -> None:
    schema = dict(CODEC.schema_json)
    schema["fields"] = [*schema["fields"], {"name": "extra", "type": "string", "default": ""}]
    codec = type(CODEC)(schema, 99)
    assert not FastWriter(codec, 32 * 1024, 32).enabled
    raw = orjson.dumps({"batch": [{"type": "track", "event": "x", "userId": "u"}]})
    assert _fast(raw, FastWriter(codec, 32 * 1024, 32)) is None


def test_iso_millis_agrees_with_parse_timestamp() -> None:
    rng = random.Random(3)
    start = datetime(1960, 1, 1, tzinfo=UTC)
    for _ in range(5000):
        moment = start + timedelta(microseconds=rng.randrange(100 * 365 * 86_400 * 10**6))
        for text in (
            moment.isoformat(timespec="milliseconds"),
            moment.isoformat(timespec="microseconds"),
            moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        ):
            assert iso_millis(text) == parse_timestamp(text, "t"), text
    for text in (
        "2026-11-22T12:00:00Z",
        "2026-11-22T12:00:60.000Z",
        "2026-13-01T00:00:00.000Z",
        "2026-11-22T12+01:00:00.000Z",
        "2026-11-22T12:00:00.000+01:00",
        "2026-11-22T12:00:00.000123x+00:00",
        "",
    ):
        assert iso_millis(text) is None, text
    with pytest.raises(InvalidEvent):
        parse_timestamp("2026-13-01T00:00:00.000Z", "t")


def _pure_python() -> ModuleType:
    """`gateway/fast_envelope.py` loaded from its source, even where a compiled build is present."""
    path = Path(gateway.fast_envelope.__file__).with_name("fast_envelope.py")
    spec = importlib.util.spec_from_file_location("gateway_fast_envelope_source", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_source_and_compiled_builds_agree() -> None:
    source = _pure_python()
    body = {"batch": _with_ids(VARIANTS[:-1]) + sample_events(50, users=5, seed=1)}
    raw = orjson.dumps(body)
    expected = _fast(raw)
    assert expected is not None
    assert _fast(raw, source.FastWriter(CODEC, 32 * 1024, 32)) == expected


def _native_modules() -> list[str]:
    """The modules the Makefile compiles (its NATIVE_SRC line)."""
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    line = next(x for x in makefile.splitlines() if x.startswith("NATIVE_SRC :="))
    return [src.removesuffix(".py").replace("/", ".") for src in line.split(":=")[1].split()]


@pytest.mark.parametrize("module", _native_modules())
def test_compiled_builds_are_not_stale(module: str) -> None:
    # `make` rebuilds the C extensions when a source changes; a stale one would run old code.
    loaded = Path(importlib.import_module(module).__file__ or "")
    if loaded.suffix != ".so":
        pytest.skip(f"{module} runs as Python here")
    stem = loaded.name.split(".")[0]
    # mypyc builds a small loader and the compiled code (`<module>__mypyc`): the newest counts.
    built = max(p.stat().st_mtime for p in loaded.parent.glob(f"{stem}*.so"))
    source = loaded.with_name(f"{stem}.py")
    assert built >= source.stat().st_mtime, f"run `make native`: {stem} is older than its source"


# Numbers and times at and past what later stages hold, written as JSON text (orjson
# cannot write most of them): the two paths must agree on every one.
_INT_EDGES = [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**18, 10**19, 10**30]
_FLOAT_EDGES = [
    "1.7976931348623157e308",
    "1.8e308",
    "1e309",
    "-1e999",
    "1E+400",
    "1e0400",
    "1e-999",
    "123456789012345678.5e290",
    "0.5",
]
_TIME_EDGES = [
    MIN_TIME_MS - 1,
    MIN_TIME_MS,
    MAX_TIME_MS,
    MAX_TIME_MS + 1,
    -(10**20),
    10**20,
]
_ISO_EDGES = [
    "1899-12-31T23:59:59.999Z",
    "1900-01-01T00:00:00.000Z",
    "2299-12-31T23:59:59.999Z",
    "2300-01-01T00:00:00.000Z",
    "0001-01-01T00:00:00.000Z",
    "9999-12-31T23:59:59.999+00:00",
    "2026-11-22T10:00:00.123456Z",
]


def _number(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return str(rng.choice(_INT_EDGES) + rng.randint(-2, 2))
    if kind == 1:
        return str(rng.randint(-(2**80), 2**80))
    if kind == 2:
        return rng.choice(_FLOAT_EDGES)
    if kind == 3:
        exponent = rng.choice([rng.randint(-400, 400), rng.randint(280, 330)])
        return f"{rng.randint(1, 99)}.{rng.randint(0, 999)}e{exponent}"
    return str(rng.randint(-1000, 1000))


def _time(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.choice(_TIME_EDGES) + rng.randint(-1, 1))
    if kind == 1:
        return str(rng.randint(-(10**14), 10**14))
    if kind == 2:
        return orjson.dumps(rng.choice(_ISO_EDGES)).decode()
    year = rng.randint(1, 9999)
    return f'"{year:04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T00:00:00.000Z"'


def _hostile_message(rng: random.Random, index: int) -> str:
    """A valid track or identify message with edge numbers and times in some fields."""
    identify = rng.random() < 0.3
    fields = [
        '"type": "identify"' if identify else '"type": "track", "event": "E"',
        f'"messageId": "m-{index}"',
        '"userId": "u"',
    ]
    json_field = "traits" if identify else "properties"
    slots = rng.sample(range(9), rng.randint(1, 3))
    for slot in slots:
        if slot == 0:
            fields.append(f'"{json_field}": {{"n": {_number(rng)}, "s": "5e123"}}')
        elif slot == 1:
            fields.append(f'"context": {{"a": [{_number(rng)}, "1234567890123456789012"]}}')
        elif slot in (2, 3):
            fields[2] = f'"userId": {_number(rng)}' if slot == 2 else fields[2]
            if slot == 3:
                fields[1] = f'"messageId": {_number(rng)}'
        elif slot == 4:
            fields.append(f'"timestamp": {_time(rng)}')
        elif slot == 5:
            fields.append(f'"originalTimestamp": {_time(rng)}')
        elif slot == 6:
            fields.append(f'"sentAt": {_time(rng)}')
        elif slot == 7:
            fields.append(f'"extra": {_number(rng)}')
        else:
            fields.append(f'"integrations": {{"n": {_number(rng)}}}')
    return "{" + ", ".join(fields) + "}"


Outcome = tuple[str, Any]


def _general_raw(raw: bytes) -> list[Outcome]:
    """The general path on request bytes: ("ok", (key, envelope)) or ("rejected", reason)."""
    body = loads(raw)
    sent_at = body.get("sentAt")
    out: list[Outcome] = []
    times: dict[Any, int | None] = {}
    for msg in body["batch"]:
        if sent_at is not None and "sentAt" not in msg:
            msg = {**msg, "sentAt": sent_at}  # noqa: PLW2901 - as handle_batch does
        try:
            event = build_event(msg, "web", RECEIVED, None, times)
        except InvalidEvent as exc:
            out.append(("rejected", str(exc)))
            continue
        out.append(("ok", (partition_key(event), CODEC.decode(CODEC.encode(event)))))
    return out


def _fits_every_stage(event: dict[str, Any]) -> bool:
    plain = [event[t] for t in ("timestamp", "received_at", "sent_at", "original_timestamp")]
    millis = [round(t.timestamp() * 1000) if isinstance(t, datetime) else t for t in plain]
    return all(t is None or in_time_range(t) for t in millis) and all(
        holdable(event[name].encode()) for name in JSON_FIELDS
    )


def test_fast_and_general_paths_agree_on_numbers_and_times_at_and_past_the_limits() -> None:
    rng = random.Random(13)
    source = _pure_python()
    fast_taken = rejected = 0
    for case in range(400):
        messages = [_hostile_message(rng, case * 10 + i) for i in range(rng.randint(1, 4))]
        sent_at = f', "sentAt": {_time(rng)}' if rng.random() < 0.2 else ""
        raw = ('{"batch": [' + ", ".join(messages) + "]" + sent_at + "}").encode()
        try:
            general = _general_raw(raw)
        except InvalidEvent:
            general = None  # a batch-level sentAt the whole request is refused for
        decoded = decode_batch(raw)
        fast = None
        if decoded is not None:
            fast = _fast(raw)
            assert _fast(raw, source.FastWriter(CODEC, 32 * 1024, 32)) == fast, raw
        if fast is not None:
            # The fast path took the request: the general path accepts the same records.
            fast_taken += 1
            assert general is not None, raw
            assert [kind for kind, _ in general] == ["ok"] * len(fast), (raw, general)
            assert _comparable(fast) == _comparable([rec for _, rec in general]), raw
        for kind, value in general or []:
            if kind == "ok":
                assert _fits_every_stage(value[1]), (raw, value)
            else:
                rejected += 1
                assert value, raw
    # Both outcomes are exercised, not only one.
    assert fast_taken > 20
    assert rejected > 200
