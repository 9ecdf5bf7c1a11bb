"""Pipeline config validation and the topics it needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.config import load_config, parse_config, tier_seconds
from ops.settings import KafkaSettings
from ops.topics import Topics, required_topics
from schemas.errors import ConfigError


def test_the_shipped_config_is_valid_and_routes_the_demo_source() -> None:
    cfg = load_config(Path(__file__).parent.parent / "sluice.yaml")
    assert cfg.routes() == {
        "demo-web": ("warehouse", "crm", "legacy-crm"),
        "demo-crm": ("warehouse",),
    }
    assert cfg.write_keys()["demo-write-key"].id == "demo-web"


def test_required_topics_cover_destination_tiers_and_dlq() -> None:
    cfg = parse_config(
        "sources: [{id: s, write_keys: [k]}]\n"
        "destinations: [{id: wh, type: clickhouse, sources: [s], retry: {tiers: [5s, 1m]}}]"
    )
    specs = {s.name: s for s in required_topics(cfg, KafkaSettings(topic_prefix="x"))}
    assert set(specs) == {
        "x.events.ingest",
        "x.events.rejected",
        "x.jobs.status",
        "x.config",
        "x.schemas",
        "x.dlq.audit",
        "x.dest.wh",
        "x.dest.wh.retry.5s",
        "x.dest.wh.retry.1m",
        "x.dest.wh.dlq",
    }
    assert specs["x.config"].config["cleanup.policy"] == "compact"
    ordered = parse_config(
        "sources: [{id: s, write_keys: [k]}]\n"
        "destinations: [{id: d, type: clickhouse, retry: {preserve_order: true}}]"
    )
    parked = {s.name: s for s in required_topics(ordered, KafkaSettings(topic_prefix="x"))}
    assert parked["x.dest.d.parked"].config["cleanup.policy"] == "compact"
    assert specs["x.events.ingest"].config["cleanup.policy"] == "delete"
    dest = Topics("x").destination("wh", ("5s", "1m"))
    assert (dest.main, dest.retry(1), dest.dlq) == (
        "x.dest.wh",
        "x.dest.wh.retry.1m",
        "x.dest.wh.dlq",
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("sources: [{id: s, write_keys: [k]}, {id: s, write_keys: [j]}]", "duplicate source 's'"),
        ("sources: [{id: a, write_keys: [k]}, {id: b, write_keys: [k]}]", "duplicate write key"),
        ("destinations: [{id: d, type: clickhouse, sources: [nope]}]", "unknown sources"),
        ("destinations: [{id: d, type: kafka}]", "destinations.0.type"),
        ("sources: [{id: Bad Id, write_keys: [k]}]", "sources.0.id"),
        ("sources: [{id: s, write_keys: []}]", "write_keys"),
        ("destinations: [{id: d, type: webhook, retry: {tiers: [soon]}}]", "retry tier 'soon'"),
        ("[1, 2]", "top level must be a mapping"),
        ("sources: [", "not valid YAML"),
        ("colour: blue", "colour"),
    ],
)
def test_invalid_config_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config(text)


def test_tier_seconds() -> None:
    assert [tier_seconds(t) for t in ("500ms", "5s", "1m", "2h")] == [0.5, 5, 60, 7200]
