"""docker-compose.kafka.yml's Kafka cluster, run for real without Docker.

The brokers' environment turns into server.properties by the apache/kafka image's rules
(KAFKA_ stripped, `___` -> `-`, `__` -> `_`, `_` -> `.`, lower case); the container names
and ports become free ports on 127.0.0.1. The three nodes run from the same Kafka release's
jars, then the compose file's one-shot services (users, topics, ACLs) run with their own
environment, and every service logs in with the credentials the compose file gives it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from core.settings import BrokerSettings
from ops.baseline_services import BASE_DIR
from ops.kafka_broker import _java_args, _log_config, ensure_jars, wait_for_broker
from ops.processes import spawn_detached
from tests.pipeline import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.kafka.yml"
BROKERS = ("kafka-1", "kafka-2", "kafka-3")
# What the image keeps out of server.properties (its kafka-propertiesSpec.json).
NOT_PROPERTIES = {"KAFKA_VERSION", "KAFKA_OPTS", "KAFKA_HEAP_OPTS", "KAFKA_LOG4J_OPTS"}


def _interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's `${NAME:?msg}`, `${NAME:-default}` and `$$`, from `values`."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if name in values:
            return values[name]
        if op == ":?":
            raise AssertionError(f"compose needs {name}: {rest}")
        return rest if op == ":-" else ""

    text = re.sub(r"(?<!\$)\$\{([A-Z0-9_]+)(?:(:\?|:-)([^}]*))?\}", one, text)
    return text.replace("$$", "$")


def _property(env_name: str) -> str:
    name = env_name.removeprefix("KAFKA_")
    return name.replace("___", "-").replace("__", "\0").replace("_", ".").replace("\0", "_").lower()


@dataclass
class ComposeCluster:
    services: dict[str, Any]
    ports: dict[tuple[str, int], int]
    passwords: dict[str, str]
    prefix: str

    def address(self, text: str, node: str | None = None) -> str:
        """`text` with the compose network's addresses made this machine's."""
        text = re.sub(
            r"(kafka-\d):(\d+)", lambda m: f"127.0.0.1:{self.ports[(m[1], int(m[2]))]}", text
        )
        if node is not None:
            # Published `localhost:<host port>`: the node's container port behind it.
            published = {
                int(spec.split(":")[1]): int(spec.split(":")[2])
                for spec in self.services[node].get("ports", [])
            }
            text = re.sub(
                r"localhost:(\d+)",
                lambda m: f"127.0.0.1:{self.ports[(node, published[int(m[1])])]}",
                text,
            )
            text = re.sub(
                r"://:(\d+)", lambda m: f"://127.0.0.1:{self.ports[(node, int(m[1]))]}", text
            )
        return text

    def env(self, service: str) -> dict[str, str]:
        """A Sluice service's environment from the compose file, on this machine."""
        env = {k: self.address(str(v)) for k, v in self.services[service]["environment"].items()}
        env["SLUICE_CONFIG_FILE"] = str(ROOT / "sluice.yaml")
        env["SLUICE_KAFKA_TOPIC_PREFIX"] = self.prefix
        return env

    def client(self, service: str) -> dict[str, str | int | float | bool]:
        """librdkafka properties that log in as `service` does."""
        env = self.env(service)
        return {
            "bootstrap.servers": env["SLUICE_KAFKA_BOOTSTRAP_SERVERS"],
            "security.protocol": env["SLUICE_KAFKA_SECURITY_PROTOCOL"],
            "sasl.mechanism": env["SLUICE_KAFKA_SASL_MECHANISM"],
            "sasl.username": env["SLUICE_KAFKA_SASL_USERNAME"],
            "sasl.password": env["SLUICE_KAFKA_SASL_PASSWORD"],
            "log_level": 0,
        }


def _run_sluice(cluster: ComposeCluster, service: str) -> subprocess.CompletedProcess[str]:
    command = cluster.services[service]["command"]
    env = {**os.environ, **cluster.env(service)}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *command],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="module")
def compose_cluster() -> Iterator[ComposeCluster]:
    passwords = {
        name: uuid.uuid4().hex
        for name in re.findall(r"\$\{([A-Z0-9_]+_PASSWORD):\?", COMPOSE.read_text())
    }
    services: dict[str, Any] = yaml.safe_load(_interpolate(COMPOSE.read_text(), passwords))[
        "services"
    ]
    ports = {(node, port): free_port() for node in BROKERS for port in (19092, 9092, 9093)}
    cluster = ComposeCluster(services, ports, passwords, f"c{uuid.uuid4().hex[:8]}")
    broker = BrokerSettings(heap="384m")
    image = services["kafka-1"]["image"]
    assert image == f"apache/kafka:{broker.version}", "the test runs the image's Kafka release"
    libs = ensure_jars(broker)
    state = (BASE_DIR / f"compose-{uuid.uuid4().hex[:8]}").resolve()
    pids: list[int] = []
    try:
        for node in BROKERS:
            env = {k: str(v) for k, v in services[node]["environment"].items()}
            folder = state / node
            folder.mkdir(parents=True)
            props = {
                _property(k): cluster.address(v, node)
                for k, v in env.items()
                if k.startswith("KAFKA_") and k not in NOT_PROPERTIES
            }
            props["log.dirs"] = str(folder / "data")
            path = folder / "server.properties"
            path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
            name, text = _log_config(broker, folder)
            (folder / name).write_text(text)
            java = [*_java_args(broker, libs, folder), env["KAFKA_OPTS"]]
            subprocess.run(
                [
                    *java,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    env["CLUSTER_ID"],
                    "-c",
                    str(path),
                ],
                check=True,
                capture_output=True,
            )
            pids.append(spawn_detached([*java, "kafka.Kafka", str(path)], folder / "broker.out"))
        admin = cluster.client("topics")
        assert wait_for_broker(str(admin["bootstrap.servers"]), 90, admin), (
            "the cluster did not start"
        )
        deadline = time.monotonic() + 60
        while len(AdminClient(admin).list_topics(timeout=5).brokers) < 3:
            assert time.monotonic() < deadline, "not every node joined the cluster"
            time.sleep(0.5)
        yield cluster
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)


def test_the_compose_cluster_refuses_anonymous_clients_and_sets_up_users_topics_and_acls(
    compose_cluster: ComposeCluster,
) -> None:
    cluster = compose_cluster
    bootstrap = cluster.client("topics")["bootstrap.servers"]
    # No listener takes a client that does not log in.
    anonymous = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    with pytest.raises(KafkaException):
        anonymous.list_topics(timeout=5)
    # The one-shot services, in the order their depends_on gives.
    assert cluster.services["topics"]["depends_on"] == {
        "kafka-users": {"condition": "service_completed_successfully"}
    }
    assert "topics" in cluster.services["acls"]["depends_on"]
    for service in ("kafka-users", "topics", "acls"):
        done = _run_sluice(cluster, service)
        assert done.returncode == 0, f"{service}: {done.stdout}{done.stderr}"
    # Sluice's topics: 3 replicas each, a write needs 2.
    admin = AdminClient(cluster.client("topics"))
    topics = {
        name: meta
        for name, meta in admin.list_topics(timeout=10).topics.items()
        if name.startswith(f"{cluster.prefix}.")
    }
    assert f"{cluster.prefix}.config" in topics
    assert all(len(p.replicas) == 3 for t in topics.values() for p in t.partitions.values())
    resource = ConfigResource(ResourceType.TOPIC, f"{cluster.prefix}.events.ingest")
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    assert configs["min.insync.replicas"].value == "2"
    # Every Sluice service logs in with the credentials the compose file gives it.
    sluice_services = [
        name
        for name, service in cluster.services.items()
        if service.get("image", "").startswith("sluice:")
    ]
    assert {"gateway", "worker", "sink", "deliver", "jobs", "orchestrator", "registry"} <= set(
        sluice_services
    )
    for name in sluice_services:
        AdminClient(cluster.client(name)).list_topics(timeout=10)
    # A wrong password is refused.
    wrong = AdminClient(cluster.client("gateway") | {"sasl.password": "guess"})
    with pytest.raises(KafkaException):
        wrong.list_topics(timeout=5)


def _produce_error(conf: dict[str, str | int | float | bool], topic: str) -> KafkaError | None:
    errors: list[KafkaError | None] = []
    producer = Producer(conf | {"message.timeout.ms": 10_000})
    # The config topic is compacted: its records have keys.
    producer.produce(topic, b"value", key=b"key", on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(15)
    assert errors, "no delivery report"
    return errors[0]


def test_only_the_compose_admin_writes_the_config(compose_cluster: ComposeCluster) -> None:
    cluster = compose_cluster
    for service in ("kafka-users", "topics", "acls"):
        assert _run_sluice(cluster, service).returncode == 0
    config = f"{cluster.prefix}.config"
    refused = _produce_error(cluster.client("gateway"), config)
    assert refused is not None
    assert refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert _produce_error(cluster.client("gateway"), f"{cluster.prefix}.events.ingest") is None
    assert _produce_error(cluster.client("worker"), config) is not None
    assert _produce_error(cluster.client("topics"), config) is None
