"""A 3-broker KRaft cluster of the test's own: Sluice's guarantees while brokers fail.

The cluster (`sluice kafka start --brokers 3`, its own ports and folders) runs beside the
suite's broker for this module. Sluice's topics on it have 3 replicas and
`min.insync.replicas=2`, so one broker down loses no acknowledged write.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from core.settings import BrokerSettings, KafkaSettings
from ops.baseline_services import BASE_DIR
from ops.kafka_broker import (
    bootstrap,
    cluster_status,
    kill_node,
    start_broker,
    start_node,
    stop_broker,
    stop_node,
)
from ops.traffic import basic_auth
from tests.integration.test_exactly_once import _event_ids
from tests.pipeline import Pipeline, free_ports, pipeline_with_topics, until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[BrokerSettings]:
    base = free_ports(6)
    state = (BASE_DIR / f"cluster-{uuid.uuid4().hex[:8]}").resolve()
    settings = BrokerSettings(
        brokers=3, port=base, controller_port=base + 1, state_dir=state, heap="512m"
    )
    start_broker(settings)
    try:
        yield settings
    finally:
        stop_broker(settings)
        shutil.rmtree(state, ignore_errors=True)


def _in_sync(settings: BrokerSettings, timeout: float = 90) -> None:
    """Wait until every node answers and no partition is under-replicated or leaderless."""
    deadline = time.monotonic() + timeout
    while True:
        found = cluster_status(settings)
        if (
            all(n.answering for n in found.nodes)
            and not found.under_replicated
            and not found.offline
            and found.topics is not None
        ):
            return
        assert time.monotonic() < deadline, (
            f"not in sync: {found.under_replicated[:5]} {found.offline[:5]}"
        )
        time.sleep(0.5)


@dataclass
class Load:
    """Events posted at a steady rate, each batch's answer kept."""

    pipe: Pipeline
    confirmed: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)
    statuses: dict[int, int] = field(default_factory=dict)
    missing_retry_after: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, per_s: float = 100, batch: int = 10) -> None:
        headers = {"Authorization": basic_auth(self.pipe.write_key)}
        timeout = aiohttp.ClientTimeout(total=30)
        n = 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self.stop.is_set():
                ids = [f"cl-{n + i}" for i in range(batch)]
                n += batch
                body = {
                    "batch": [
                        {"type": "track", "event": "Clustered", "userId": "u", "messageId": i}
                        for i in ids
                    ]
                }
                self.sent.update(ids)
                started = time.monotonic()
                try:
                    async with session.post(
                        f"{self.pipe.gateway_url}/v1/batch", json=body, headers=headers
                    ) as resp:
                        await resp.read()
                        self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
                        if resp.status == 200:
                            self.confirmed.update(ids)
                        elif resp.status == 503 and not resp.headers.get("Retry-After"):
                            self.missing_retry_after += 1
                except (aiohttp.ClientError, TimeoutError):
                    self.statuses[0] = self.statuses.get(0, 0) + 1
                await asyncio.sleep(max(0.0, batch / per_s - (time.monotonic() - started)))


def _landed(pipe: Pipeline) -> tuple[int, set[str]]:
    rows = pipe.query("SELECT count(), uniqExact(event_id) FROM events")
    ids = {r[0] for r in pipe.query("SELECT event_id FROM events")}
    assert rows[0][0] == rows[0][1], f"duplicates in the warehouse: {rows}"
    return int(rows[0][0]), ids


async def _drained(load: Load, within_s: float = 180) -> None:
    """Every confirmed event in the warehouse exactly once; nothing there that was not sent."""
    deadline = time.monotonic() + within_s
    while True:
        count, ids = await asyncio.to_thread(_landed, load.pipe)
        if load.confirmed <= ids:
            assert ids <= load.sent, "rows of events nobody sent"
            return
        assert time.monotonic() < deadline, (
            f"{len(load.confirmed - ids)} confirmed events not in the warehouse ({count} rows)"
        )
        await asyncio.sleep(1)


@pytest.fixture
def pipe(cluster: BrokerSettings, tmp_path: Path) -> Iterator[Pipeline]:
    """A pipeline on the cluster; its services are stopped after the test, whatever happened."""
    made = pipeline_with_topics(tmp_path, bootstrap(cluster), f"c{uuid.uuid4().hex[:8]}")
    made.env["SLUICE_GATEWAY_PRODUCE_TIMEOUT_S"] = "5"
    try:
        yield made
    finally:
        made.stop()


def test_sluice_topics_on_the_cluster_have_three_replicas_and_two_in_sync(
    cluster: BrokerSettings, pipe: Pipeline
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap(cluster), "log_level": 0})
    ingest = f"{pipe.prefix}.events.ingest"
    # Created on one node: the others learn of it from the metadata log a moment later.
    deadline = time.monotonic() + 15
    while ingest not in (topics := admin.list_topics(timeout=10).topics):
        assert time.monotonic() < deadline, "the topic is not in the cluster's metadata"
        time.sleep(0.2)
    assert {len(p.replicas) for p in topics[ingest].partitions.values()} == {3}
    resource = ConfigResource(ConfigResource.Type.TOPIC, ingest)
    config = admin.describe_configs([resource])[resource].result(10)
    assert config["min.insync.replicas"].value == "2"
    found = cluster_status(cluster)
    assert [n.answering for n in found.nodes] == [True, True, True]
    assert found.controller in (1, 2, 3)


def test_status_shows_a_node_down_and_its_partitions_under_replicated_until_it_is_back(
    cluster: BrokerSettings, pipe: Pipeline
) -> None:
    _in_sync(cluster)
    assert kill_node(cluster, 3)
    try:
        deadline = time.monotonic() + 60
        while True:
            found = cluster_status(cluster)
            if found.under_replicated:
                break
            assert time.monotonic() < deadline, "no partition shown under-replicated"
            time.sleep(0.5)
        assert [n.pid is not None for n in found.nodes] == [True, True, False]
        assert any(name.startswith(f"{pipe.prefix}.") for name in found.under_replicated)
        assert not found.offline  # 2 of 3 replicas left: every partition has a leader
    finally:
        start_node(cluster, 3)
    _in_sync(cluster)
    # A graceful stop of one node and a start again (a rolling restart's step).
    assert stop_node(cluster, 2)
    assert cluster_status(cluster).nodes[1].pid is None
    start_node(cluster, 2)
    _in_sync(cluster)


async def test_brokers_killed_one_after_another_under_load_lose_and_duplicate_nothing(
    cluster: BrokerSettings, pipe: Pipeline
) -> None:
    pipe.start("gateway", "worker", "sink")
    load = Load(pipe)
    sender = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(5)
        for node in (1, 2):
            # A crash: no controlled shutdown, its partitions' leaders move on election.
            assert await asyncio.to_thread(kill_node, cluster, node)
            await asyncio.sleep(8)
            await asyncio.to_thread(start_node, cluster, node)
            await asyncio.to_thread(_in_sync, cluster)
            await asyncio.sleep(3)
    finally:
        load.stop.set()
        await sender
    assert set(load.statuses) <= {200, 503}, load.statuses
    assert load.missing_retry_after == 0
    assert load.statuses.get(200, 0) > 20, load.statuses
    await _drained(load)


async def test_a_rolling_restart_under_load_loses_and_duplicates_nothing(
    cluster: BrokerSettings, pipe: Pipeline
) -> None:
    pipe.start("gateway", "worker", "sink")
    load = Load(pipe)
    sender = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(3)
        for node in (1, 2, 3):
            # A controlled shutdown: leadership moves before the node goes.
            assert await asyncio.to_thread(stop_node, cluster, node)
            await asyncio.to_thread(start_node, cluster, node)
            await asyncio.to_thread(_in_sync, cluster)
    finally:
        load.stop.set()
        await sender
    assert set(load.statuses) <= {200, 503}, load.statuses
    assert load.missing_retry_after == 0
    assert load.statuses.get(200, 0) > 20, load.statuses
    await _drained(load)


async def test_exactly_once_on_the_cluster_with_a_broker_killed_keeps_the_input_multiset(
    cluster: BrokerSettings, pipe: Pipeline
) -> None:
    pipe.env["SLUICE_WORKER_PROCESSING_GUARANTEE"] = "exactly_once"
    kafka = KafkaSettings(bootstrap_servers=bootstrap(cluster), topic_prefix=pipe.prefix)
    ingest, output = f"{pipe.prefix}.events.ingest", f"{pipe.prefix}.dest.warehouse"
    pipe.start("gateway", "worker")
    load = Load(pipe)
    sender = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(5)
        # The node that leads most of the output's partitions: its transactions are open.
        assert await asyncio.to_thread(kill_node, cluster, _busiest(cluster, output))
        await asyncio.sleep(8)
    finally:
        load.stop.set()
        await sender
    for node in (1, 2, 3):
        await asyncio.to_thread(start_node, cluster, node)
    assert load.statuses.get(200, 0) > 20, load.statuses

    def same() -> bool:
        source = _event_ids(kafka, ingest, "read_committed")
        return sum(source.values()) > 0 and _event_ids(kafka, output, "read_committed") == source

    await until(same, 180, "the read_committed output equal to the input")
    source = _event_ids(kafka, ingest, "read_committed")
    assert load.confirmed <= set(source), "a confirmed event is not on the ingest topic"


def _busiest(settings: BrokerSettings, topic: str) -> int:
    admin = AdminClient({"bootstrap.servers": bootstrap(settings), "log_level": 0})
    leaders = [
        p.leader for p in admin.list_topics(topic, timeout=10).topics[topic].partitions.values()
    ]
    return max(set(leaders), key=leaders.count)
