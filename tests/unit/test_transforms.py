"""Per-destination filters and transforms in the processor: records, counts and DLQ entries."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from core.config import parse_config
from core.errors import ConfigError
from core.settings import TransformSettings
from core.topics import Topics
from gateway.envelope import build_event
from schemas.codec import event_codec
from streams.processor import Incoming, Router
from tests.configs import Configs

TOPICS = Topics("t")
CODEC = event_codec(logical_types=False)
TRANSFORMS = TransformSettings(modules=("tests.transforms",))
CONFIGS = Configs()
MESSAGES: list[dict[str, Any]] = [
    {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "messageId": "t1",
        "properties": {"total": 120, "plan": "pro", "cart": {"items": 3}},
    },
    {
        "type": "track",
        "event": "Order Completed",
        "userId": "u2",
        "messageId": "t2",
        "properties": {"total": 15, "plan": "free"},
    },
    {
        "type": "track",
        "event": "Product Viewed",
        "userId": "u1",
        "messageId": "t3",
        "properties": {"sku": "A"},
    },
    {"type": "page", "userId": "u3", "name": "Home", "messageId": "p1"},
    {"type": "identify", "userId": "u1", "messageId": "i1", "traits": {"plan": "pro"}},
]


def _router(**fields: Any) -> Router:
    """A router for one warehouse destination `d` of the source `web`, with these fields."""
    cfg = CONFIGS.model(
        CONFIGS.warehouse("d", sources=["web"], **fields),
        sources=[CONFIGS.source("web")],
        transforms=TRANSFORMS,
    )
    return Router(cfg, TOPICS, CODEC, TRANSFORMS)


def _batch() -> list[Incoming]:
    out = []
    for i, msg in enumerate(MESSAGES):
        event = build_event(msg, "web", 1_795_389_209_000)
        out.append(
            Incoming(msg["userId"].encode(), CODEC.encode(event), "t.events.ingest", 0, i, 7)
        )
    return out


def _events(records: list[Any]) -> list[dict[str, Any]]:
    return [CODEC.decode(value) for _, value, _ in records]


def _headers(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record[2]}


def test_filters_by_type_name_and_properties() -> None:
    router = _router(
        filter={
            "allow_types": ["track", "identify"],
            "deny_events": ["Product Viewed"],
            "where": [
                {"property": "plan", "op": "eq", "value": "pro"},
                {"property": "cart.items", "op": "gte", "value": 2},
            ],
        }
    )
    routed = router.route(_batch())
    # t1 passes everything; t2 fails the plan rule, t3 is a denied name, p1 a denied type,
    # i1 (identify: rules read traits) has no cart.
    assert [e["event_id"] for e in _events(routed.outputs[TOPICS.destination("d").main])] == ["t1"]
    assert routed.delivered == {"d": 1}
    assert routed.filtered == {"d": 4}


def test_a_fan_out_transform_writes_both_records() -> None:
    routed = _router(
        filter={"allow_types": ["track"]}, transform={"function": "tests.transforms:fan_out"}
    ).route(_batch())
    events = _events(routed.outputs[TOPICS.destination("d").main])
    assert [e["event_id"] for e in events] == ["t1", "t1-copy", "t2", "t2-copy", "t3", "t3-copy"]
    assert orjson.loads(events[1]["properties"])["copied"] is True
    assert "copied" not in orjson.loads(events[0]["properties"])
    assert routed.delivered == {"d": 6}
    assert routed.transformed == {"d": 3}
    assert routed.filtered == {"d": 2}


def test_a_dropping_transform_counts_what_it_dropped() -> None:
    routed = _router(transform={"function": "tests.transforms.drop_pages"}).route(_batch())
    events = _events(routed.outputs[TOPICS.destination("d").main])
    assert [e["event_id"] for e in events] == ["t1", "t2", "t3", "i1"]
    assert events[0]["event"] == "ORDER COMPLETED"
    assert routed.dropped == {"d": 1}
    assert routed.transformed == {"d": 5}
    assert routed.delivered == {"d": 4}


@pytest.mark.parametrize(
    ("function", "failing", "error_class", "reason"),
    [
        ("explode", ["i1"], "ValueError", "cannot handle i1"),
        ("not_an_event", ["t1", "t2", "t3", "p1", "i1"], "TransformResultError", "not str"),
    ],
)
def test_a_failing_transform_sends_the_event_to_the_dlq_with_the_traceback(
    function: str, failing: list[str], error_class: str, reason: str
) -> None:
    routed = _router(transform={"function": f"tests.transforms:{function}"}).route(_batch())
    dlq = routed.outputs[TOPICS.destination("d").dlq]
    assert [CODEC.decode(value)["event_id"] for _, value, _ in dlq] == failing
    headers = _headers(dlq[0])
    assert headers["sluice.error.class"] == error_class
    assert reason in headers["sluice.error.message"]
    assert "Traceback" in headers["sluice.error.traceback"]
    assert headers["sluice.stage"] == "transform"
    assert headers["sluice.destination"] == "d"
    assert headers["sluice.original.topic"] == "t.events.ingest"
    assert headers["sluice.original.offset"] == str(
        MESSAGES.index(next(m for m in MESSAGES if m["messageId"] == failing[0]))
    )
    assert routed.failed == {"d": len(failing)}
    assert routed.transformed.get("d", 0) == len(MESSAGES) - len(failing)
    assert routed.delivered.get("d", 0) == len(MESSAGES) - len(failing)


def test_a_slow_transform_is_stopped_at_its_limit() -> None:
    # The transform sleeps far past its limit: cut off there, the page is in the DLQ.
    routed = _router(
        filter={"allow_types": ["page"]},
        transform={"function": "tests.transforms:slow", "timeout_s": 0.2},
    ).route(_batch())
    (record,) = routed.outputs[TOPICS.destination("d").dlq]
    assert _headers(record)["sluice.error.class"] == "TransformTimeout"
    assert "0.2 s limit" in _headers(record)["sluice.error.message"]


def test_destinations_without_rules_get_the_record_as_it_came() -> None:
    batch = _batch()
    routed = _router().route(batch)
    assert [v for _, v, _ in routed.outputs[TOPICS.destination("d").main]] == [
        r.value for r in batch
    ]


@pytest.mark.parametrize(
    ("destination", "reason"),
    [
        (
            "{id: d, type: clickhouse, transform: {function: 'nowhere.module:f'}}",
            "module 'nowhere.module' is not under an allowed prefix",
        ),
        (
            "{id: d, type: clickhouse, transform: {function: 'tests.transforms:a.b'}}",
            r"transform\.function",
        ),
        (
            "{id: d, type: clickhouse, filter: {where: [{property: a, op: in, value: 3}]}}",
            "`in` needs a list",
        ),
        (
            "{id: d, type: clickhouse, filter: {where: [{property: a, op: sometimes}]}}",
            "filter.where.0.op",
        ),
    ],
)
def test_invalid_rules_are_refused_with_the_reason(destination: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config(f"destinations: [{destination}]", transforms=TRANSFORMS)


@pytest.mark.parametrize(
    ("function", "reason"),
    [
        ("tests.transforms:missing", "has no function 'missing'"),
        ("tests.transforms.nowhere:f", "cannot import 'tests.transforms.nowhere'"),
    ],
)
def test_a_transform_that_cannot_be_imported_is_refused_by_the_router(
    function: str, reason: str
) -> None:
    # Validating never imports: the config is valid by name; the router, which imports
    # what it runs, refuses it and keeps routing by the config it had.
    router = _router()
    cfg = CONFIGS.model(
        CONFIGS.warehouse("d", sources=["web"], transform={"function": function}),
        sources=[CONFIGS.source("web")],
        transforms=TRANSFORMS,
    )
    with pytest.raises(ConfigError, match=reason):
        router.update(cfg)
    assert router.route(_batch()).delivered == {"d": len(MESSAGES)}


def _planned_router(mode: str) -> Router:
    plan = {
        "on_violation": mode,
        "unplanned": "violate",
        "events": {
            "Order Completed": {
                "required": {"total": "number", "currency": "string"},
                "optional": {"plan": "string"},
            },
            "Product Viewed": {"required": {"sku": "string"}},
        },
    }
    cfg = CONFIGS.model(
        CONFIGS.warehouse("d", sources=["web"]),
        sources=[CONFIGS.source("web", tracking_plan=plan)],
    )
    return Router(cfg, TOPICS, CODEC, TRANSFORMS)


def test_a_tracking_plan_rejects_what_breaks_it_with_the_reason() -> None:
    routed = _planned_router("reject").route(_batch())
    # t1 and t2 lack `currency`; t3 has its sku; the page and the identify are not track events.
    delivered = _events(routed.outputs[TOPICS.destination("d").main])
    assert [e["event_id"] for e in delivered] == ["t3", "p1", "i1"]
    rejected = routed.outputs[TOPICS.rejected]
    assert [CODEC.decode(v)["event_id"] for _, v, _ in rejected] == ["t1", "t2"]
    headers = _headers(rejected[0])
    assert headers["sluice.error.class"] == "TrackingPlanViolation"
    assert "property 'currency' is required" in headers["sluice.reason"]
    assert routed.rejected == 2


def test_a_tracking_plan_flags_what_breaks_it_and_lets_it_through() -> None:
    batch = _batch()
    batch.append(
        Incoming(
            b"u9",
            CODEC.encode(
                build_event(
                    {
                        "type": "track",
                        "event": "Secret",
                        "userId": "u9",
                        "messageId": "t9",
                        "properties": {"total": "12"},
                    },
                    "web",
                    1_795_389_209_000,
                )
            ),
            "t.events.ingest",
            0,
            9,
            7,
        )
    )
    routed = _planned_router("flag").route(batch)
    delivered = {e["event_id"]: e for e in _events(routed.outputs[TOPICS.destination("d").main])}
    assert len(delivered) == len(batch)
    violations = {
        k: orjson.loads(e["context"]).get("tracking_plan", {}).get("violations")
        for k, e in delivered.items()
    }
    assert violations["t1"] == ["property 'currency' is required"]
    assert violations["t3"] is None
    assert violations["t9"] == ["event 'Secret' is not in the tracking plan"]
    assert routed.flagged == 3


def test_a_source_the_config_does_not_know_waits_then_is_rejected_with_the_reason() -> None:
    router = _router()
    late = [
        rec._replace(value=CODEC.encode(CODEC.decode(rec.value) | {"source_id": "late"}))
        for rec in _batch()[:2]
    ]
    routed = router.route([*_batch(), *late])
    # Known events are routed; the unknown source's are held back, not counted as unrouted.
    assert routed.delivered == {"d": len(MESSAGES)}
    assert routed.unknown == late
    assert routed.unrouted == 0
    assert TOPICS.rejected not in routed.outputs

    # The config caught up: now they are routed ...
    router.update(
        CONFIGS.model(
            CONFIGS.warehouse("d", sources=["web", "late"]),
            sources=[CONFIGS.source("web"), CONFIGS.source("late", keys=["k2"])],
        )
    )
    again = router.route(routed.unknown, final=True)
    assert [e["event_id"] for e in _events(again.outputs[TOPICS.destination("d").main])] == [
        "t1",
        "t2",
    ]
    # ... and a source that is still unknown is rejected with a reason, never dropped.
    ghost = [late[0]._replace(value=CODEC.encode(CODEC.decode(late[0].value) | {"source_id": "x"}))]
    refused = router.route(ghost, final=True)
    assert refused.rejected == 1
    headers = _headers(refused.outputs[TOPICS.rejected][0])
    assert headers["sluice.error.class"] == "UnknownSource"
    assert headers["sluice.reason"] == "source 'x' is not in the config"
