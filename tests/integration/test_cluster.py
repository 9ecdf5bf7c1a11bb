"""A 3-broker KRaft cluster of the test's own: replication, and the tooling around nodes.

The cluster (`sluice kafka start --brokers 3`, its own ports and folders) runs beside the
suite's broker for this module. Sluice's topics on it have 3 replicas and
`min.insync.replicas=2`, so one broker down loses no acknowledged write.
"""

from __future__ import annotations

import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from core.settings import BrokerSettings
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
from tests.pipeline import Pipeline, pipeline_with_topics

pytestmark = pytest.mark.integration


def _free_block(size: int) -> int:
    """A port p with p .. p + size - 1 all free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + size >= 65535:
            continue
        taken = False
        for port in range(base, base + size):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    taken = True
                    break
        if not taken:
            return base
    raise AssertionError("no block of free ports")


@pytest.fixture(scope="module")
def cluster() -> Iterator[BrokerSettings]:
    base = _free_block(6)
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


def _cluster_pipeline(settings: BrokerSettings, root: Path) -> Pipeline:
    pipe = pipeline_with_topics(root, bootstrap(settings), f"c{uuid.uuid4().hex[:8]}")
    pipe.env["SLUICE_GATEWAY_PRODUCE_TIMEOUT_S"] = "5"
    return pipe


def test_sluice_topics_on_the_cluster_have_three_replicas_and_two_in_sync(
    cluster: BrokerSettings, tmp_path: Path
) -> None:
    pipe = _cluster_pipeline(cluster, tmp_path)
    admin = AdminClient({"bootstrap.servers": bootstrap(cluster), "log_level": 0})
    topics = admin.list_topics(timeout=10).topics
    ingest = f"{pipe.prefix}.events.ingest"
    assert {len(p.replicas) for p in topics[ingest].partitions.values()} == {3}
    resource = ConfigResource(ConfigResource.Type.TOPIC, ingest)
    config = admin.describe_configs([resource])[resource].result(10)
    assert config["min.insync.replicas"].value == "2"
    found = cluster_status(cluster)
    assert [n.answering for n in found.nodes] == [True, True, True]
    assert found.controller in (1, 2, 3)


def test_status_shows_a_node_down_and_its_partitions_under_replicated_until_it_is_back(
    cluster: BrokerSettings, tmp_path: Path
) -> None:
    pipe = _cluster_pipeline(cluster, tmp_path)
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
