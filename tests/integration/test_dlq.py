"""DLQ operations on the real broker: list, show, dry run, redrive once, audit."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from confluent_kafka import Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)
from typer.testing import CliRunner

from core.settings import KafkaSettings
from core.topics import Topics
from ops.cli import app
from ops.dlq import DlqFilter, RefSet, dead_letters, read_topic, redrive
from ops.errors import DlqError
from ops.traffic import sample_events, send_batches
from tests.configs import Configs
from tests.pipeline import free_port, pipeline_with_topics, webhook_receiver

pytestmark = pytest.mark.integration


async def test_redrive_after_the_destination_heals_delivers_every_record_once(
    configs: Configs, broker: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 20
    port = free_port()
    healed = False
    delivered: dict[str, int] = {}
    everything = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if not healed:
            return web.Response(status=422, text="schema mismatch")
        delivered[body["messageId"]] = delivered.get(body["messageId"], 0) + 1
        if len(delivered) == count:
            everything.set()
        return web.Response(status=200)

    pipe = pipeline_with_topics(
        tmp_path,
        broker,
        prefix,
        configs.text(configs.webhook(f"http://127.0.0.1:{port}/hook", timeout_s=2)),
    )
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", broker)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", prefix)
    cli = CliRunner()
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start)
        events = sample_events(count, seed=21)
        assert (await send_batches(pipe.gateway_url, pipe.write_key, events)).accepted == count
        for _ in range(120):
            if len(await asyncio.to_thread(dead_letters, kafka, "hook")) == count:
                break
            await asyncio.sleep(0.5)
        letters = await asyncio.to_thread(dead_letters, kafka, "hook")
        assert len(letters) == count
        assert {r.error_class for r in letters} == {"DeliveryRejected"}

        listing = await asyncio.to_thread(cli.invoke, app, ["dlq", "list", "hook"])
        assert listing.exit_code == 0, listing.output
        assert f"{count} records" in listing.output
        shown = await asyncio.to_thread(cli.invoke, app, ["dlq", "show", "hook", letters[0].ref])
        assert shown.exit_code == 0, shown.output
        assert '"sluice.error.message": "HTTP 422: schema mismatch"' in shown.output

        dry = await asyncio.to_thread(cli.invoke, app, ["dlq", "redrive", "hook", "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert f"would redrive {count} of {count}" in dry.output
        await asyncio.sleep(2)
        assert delivered == {}

        healed = True
        first = await asyncio.to_thread(
            cli.invoke, app, ["dlq", "redrive", "hook", "--rate", "100"]
        )
        assert first.exit_code == 0, first.output
        assert f"redrove {count} of {count}" in first.output
        await asyncio.wait_for(everything.wait(), 60)
        again = await asyncio.to_thread(cli.invoke, app, ["dlq", "redrive", "hook"])
        assert f"redrove 0 of {count} matching records ({count} already redriven)" in again.output
        await asyncio.sleep(3)
        await asyncio.to_thread(pipe.stop)

    assert delivered == {e["messageId"]: 1 for e in events}
    audits = [a for a in await asyncio.to_thread(_audits, kafka) if a["kind"] == "done"]
    assert [(a["dry_run"], a["redriven"]) for a in audits] == [
        (True, 0),
        (False, count),
        (False, 0),
    ]


def _audits(kafka: KafkaSettings) -> list[dict[str, Any]]:
    return [
        orjson.loads(m.value()) for m in read_topic(kafka, Topics(kafka.topic_prefix).dlq_audit)
    ]


def test_unknown_destination_fails_with_one_line(
    monkeypatch: pytest.MonkeyPatch, broker: str
) -> None:
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", broker)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", "nothing-here")
    result = CliRunner().invoke(app, ["dlq", "list", "ghost"])
    assert result.exit_code == 1
    assert "does not exist" in result.output


def _topics(kafka: KafkaSettings, audit_config: dict[str, str] | None = None) -> None:
    """The hook destination's DLQ and topic (2 partitions each) and the audit topic."""
    topics = Topics(kafka.topic_prefix)
    dest = topics.destination("hook")
    admin = AdminClient(kafka.client_config())
    new = [
        NewTopic(dest.main, 2, 1),
        NewTopic(dest.dlq, 2, 1),
        NewTopic(topics.dlq_audit, 1, 1, config=audit_config or {}),
    ]
    for fut in admin.create_topics(new).values():
        fut.result(30)


def _set_audit_max_bytes(kafka: KafkaSettings, value: str) -> None:
    """Change the audit topic's max.message.bytes and wait until the broker shows it."""
    admin = AdminClient(kafka.client_config())
    name = Topics(kafka.topic_prefix).dlq_audit
    entry = ConfigEntry("max.message.bytes", value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=[entry])
    admin.incremental_alter_configs([resource])[resource].result(30)
    plain = ConfigResource(ConfigResource.Type.TOPIC, name)
    deadline = time.monotonic() + 30
    while admin.describe_configs([plain])[plain].result(30)["max.message.bytes"].value != value:
        assert time.monotonic() < deadline, "the broker did not take the config"
        time.sleep(0.2)
    time.sleep(1)  # the describe and the log's config are updated apart


def _dead_letters(kafka: KafkaSettings, per_partition: int, classes: tuple[str, ...]) -> None:
    """`per_partition` DLQ records on each partition, their error classes in turn."""
    producer = Producer(kafka.client_config())
    dlq = Topics(kafka.topic_prefix).destination("hook").dlq
    for p in (0, 1):
        for i in range(per_partition):
            headers: list[tuple[str, str | bytes | None]] = [
                ("sluice.error.class", classes[i % len(classes)]),
                ("sluice.destination", "hook"),
            ]
            producer.produce(dlq, f"v{p}-{i}".encode(), b"k", partition=p, headers=headers)
    assert producer.flush(30) == 0


def _redriven(kafka: KafkaSettings) -> Counter[str]:
    """How often each DLQ record (`partition:offset`) is on the destination's topic."""
    dest = Topics(kafka.topic_prefix).destination("hook")
    seen: Counter[str] = Counter()
    for msg in read_topic(kafka, dest.main):
        origin = dict(msg.headers() or [])["sluice.redrive.from"].decode()
        seen[origin.removeprefix(f"{dest.dlq}:")] += 1
    return seen


def test_a_large_redrive_audits_within_the_audit_topics_message_size(
    kafka: KafkaSettings,
) -> None:
    limit = 2048
    _topics(kafka, {"max.message.bytes": str(limit)})
    # Every other record matches: 600 scattered offsets, which a list of each record
    # redriven (about 5 kB) or even of its ranges would not fit into one audit record.
    _dead_letters(kafka, 600, ("A", "B"))
    report = redrive(kafka, "hook", DlqFilter(error_class="A"))

    assert report.redriven == 600
    wanted = {f"{p}:{o}" for p in (0, 1) for o in range(0, 600, 2)}
    assert _redriven(kafka) == dict.fromkeys(wanted, 1)
    topic = Topics(kafka.topic_prefix).dlq_audit
    bodies = [m.value() for m in read_topic(kafka, topic)]
    assert bodies, "no audit record was written"
    assert all(len(b) <= limit for b in bodies)
    audits = [orjson.loads(b) for b in bodies]
    assert [a["kind"] for a in audits[:1]] == ["start"]
    done = audits[1:]
    audited = RefSet()
    for d in done:
        assert (d["kind"], d["id"], d["redriven"]) == ("done", audits[0]["id"], 600)
        for text in d["records"]:
            audited.add_text(text)
    assert len(audited) == 600
    assert all(ref in audited for ref in wanted)
    assert len(done) > 1  # split into parts that fit
    assert [(d["part"], d["parts"]) for d in done] == [(i, len(done)) for i in range(len(done))]
    assert report.audit_records == len(bodies)

    again = redrive(kafka, "hook", DlqFilter(error_class="A"))
    assert (again.redriven, again.skipped) == (0, 600)
    assert sum(_redriven(kafka).values()) == 600


def test_a_rerun_after_a_failed_audit_write_redrives_every_record_once(
    kafka: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _topics(kafka)
    _dead_letters(kafka, 150, ("A",))

    def break_the_audit_topic(done: int, total: int) -> None:
        if done == total:  # every record is produced; the audit is written next
            _set_audit_max_bytes(kafka, "64")

    with pytest.raises(DlqError, match="audit"):
        redrive(kafka, "hook", DlqFilter(), on_progress=break_the_audit_topic)
    assert sum(_redriven(kafka).values()) == 300
    _set_audit_max_bytes(kafka, "1048588")
    _dead_letters(kafka, 5, ("A",))  # new dead letters meanwhile: they go, once

    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", kafka.topic_prefix)
    rerun = CliRunner().invoke(app, ["dlq", "redrive", "hook"])
    assert rerun.exit_code == 0, rerun.output
    assert "had sent 300 records without auditing them" in rerun.output
    assert "redrove 10 of 310 matching records (300 already redriven)" in rerun.output
    wanted = {f"{p}:{o}" for p in (0, 1) for o in range(155)}
    assert _redriven(kafka) == dict.fromkeys(wanted, 1)

    third = redrive(kafka, "hook", DlqFilter())
    assert (third.recovered, third.redriven, third.skipped) == (0, 0, 310)
    assert _redriven(kafka) == dict.fromkeys(wanted, 1)
