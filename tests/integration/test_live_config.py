"""Live config: applied while two workers run under load, a new write key and a new
destination work without restarts, nothing already flowing is lost or duplicated; an
invalid config is refused and never reaches a service. (How soon a config applies is
measured by `sluice bench`, not asserted here.)"""

from __future__ import annotations

import asyncio
import time
import urllib.error
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.settings import KafkaSettings
from ops.cli import app
from ops.processes import BackgroundProcess
from ops.traffic import basic_auth, sample_events, send_batches
from schemas.codec import event_codec
from tests.configs import Configs
from tests.conftest import scaled
from tests.pipeline import Pipeline, free_port, read_records, until

pytestmark = pytest.mark.integration


def _grown(key: str, audit_type: str = "clickhouse") -> str:
    """The pipeline's config grown by a source `late-src` and a destination `audit`."""
    configs = Configs()
    both = ("test-src", "late-src")
    audit = {"table": "audit_events", "layout": False}
    warehouse = configs.warehouse(sources=both, retry={"tiers": ["1s", "3s"], "max_attempts": 3})
    return configs.text(
        warehouse,
        configs.warehouse("audit", sources=both, settings=audit) | {"type": audit_type},
        sources=[configs.source(keys=[key]), configs.source("late-src", keys=["late-key"])],
    )


async def _post_until_accepted(pipe: Pipeline, key: str, deadline_s: float) -> str:
    """POST one event with `key` until it is accepted; its messageId."""
    import aiohttp  # noqa: PLC0415

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < deadline_s:
            message_id = f"late-{time.monotonic_ns()}"
            body = {
                "batch": [
                    {"type": "track", "event": "Late", "userId": "u", "messageId": message_id}
                ]
            }
            async with session.post(
                f"{pipe.gateway_url}/v1/batch",
                json=body,
                headers={"Authorization": basic_auth(key)},
            ) as resp:
                if resp.status == 200:
                    return message_id
                assert resp.status == 401
            await asyncio.sleep(0.2)
    raise AssertionError(f"{key} not accepted within {deadline_s}s")


async def test_config_applied_under_load_takes_effect_without_restarts_or_losses(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    second = BackgroundProcess("worker-2", pipeline.root / "run")
    pipeline.start()
    second.start(
        ["worker"],
        {
            **pipeline.env,
            "SLUICE_WORKER_METRICS_PORT": str(free_port()),
            "SLUICE_WORKER_DATA_DIR": str(pipeline.root / "worker-2"),
        },
    )
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", pipeline.bootstrap)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", pipeline.prefix)
    events = sample_events(scaled(4000), users=100, seed=1)
    order = {e["messageId"]: i for i, e in enumerate(events)}
    user_of = {e["messageId"]: str(e.get("userId") or e.get("anonymousId")) for e in events}
    sent: list[str] = []
    accepted = 0
    stop_load = asyncio.Event()

    async def load() -> None:
        # About 400 events a second, 20 a request, until stopped (or the events run out).
        nonlocal accepted
        for i in range(0, len(events), 20):
            if stop_load.is_set():
                return
            part = events[i : i + 20]
            report = await send_batches(pipeline.gateway_url, pipeline.write_key, part, 20)
            assert report.accepted == len(part), report
            accepted += report.accepted
            sent.extend(e["messageId"] for e in part)
            await asyncio.sleep(0.05)

    def audited() -> set[str]:
        try:
            return {r[0] for r in pipeline.query("SELECT event_id FROM audit_events")}
        except urllib.error.HTTPError:  # no table yet
            return set()

    try:
        loader = asyncio.create_task(load())
        await until(lambda: len(sent) >= 400, 60, "load flowing before the apply")

        bad = tmp_path / "bad.yaml"
        bad.write_text(_grown(pipeline.write_key, audit_type="kafka"))
        refused = await asyncio.to_thread(CliRunner().invoke, app, ["config", "apply", str(bad)])
        assert refused.exit_code == 1
        assert "destinations.1.type" in refused.output

        grown = tmp_path / "grown.yaml"
        grown.write_text(_grown(pipeline.write_key))
        applied = await asyncio.to_thread(CliRunner().invoke, app, ["config", "apply", str(grown)])
        assert applied.exit_code == 0, applied.output
        late_id = await _post_until_accepted(pipeline, "late-key", 60.0)

        # The load goes on until every user's events reach the new destination: both
        # workers (each with its own partitions) follow the config by then.
        users = set(user_of.values())
        await until(
            lambda: {user_of[m] for m in audited() if m in user_of} == users,
            120,
            "events of every user in the new destination",
        )
        stop_load.set()
        await loader
    finally:
        stop_load.set()

    try:
        expected = accepted + 1  # the load and the late source's event
        assert await asyncio.to_thread(pipeline.wait_rows, expected, 180) >= expected
        # Nothing already flowing was lost or duplicated (one row an event_id, read FINAL).
        everything = {*sent, late_id}
        assert pipeline.query("SELECT count(), uniqExact(event_id) FROM events FINAL") == [
            [expected, expected]
        ]
        assert {r[0] for r in pipeline.query("SELECT event_id FROM events FINAL")} == everything
        # The late event reached the new destination, and each user's events reach it from
        # the moment its worker follows the config on: of each user's events, those in
        # `audit` are all that user sent from some point.
        # Every event the worker routed to `audit` (all is routed by now) is loaded.
        kafka = KafkaSettings(bootstrap_servers=pipeline.bootstrap, topic_prefix=pipeline.prefix)
        codec = event_codec(logical_types=False)
        routed = {
            codec.decode(m.value())["event_id"]
            for m in read_records(kafka, f"{pipeline.prefix}.dest.audit")
        }
        assert late_id in routed
        await until(lambda: audited() == routed, 60, "everything routed to audit loaded")
        audit = audited()
        assert audit <= everything
        by_user: dict[str, list[str]] = {}
        for m in sorted(sent, key=order.__getitem__):
            by_user.setdefault(user_of[m], []).append(m)
        for user, ids in by_user.items():
            flags = [m in audit for m in ids]
            first = flags.index(True)
            assert all(flags[first:]), f"{user}: an event after one in audit is missing from it"
    finally:
        second.stop(timeout=60)
