"""Test harness: a whole pipeline (gateway, worker, sink) as real processes on a real broker."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from confluent_kafka import Consumer, KafkaError

from core.admin import apply_topics
from core.config import parse_config
from core.settings import KafkaSettings
from core.topics import required_topics
from ops.processes import BackgroundProcess
from tests.configs import KEY, Configs

# A warehouse destination with two short retry tiers.
CONFIG = Configs().text(Configs().warehouse(retry={"tiers": ["1s", "3s"], "max_attempts": 3}))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(size: int) -> int:
    """A port p with p .. p + size - 1 all free on 127.0.0.1 (a local cluster's block)."""
    for _ in range(200):
        base = free_port()
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


def http_json(
    url: str,
    body: dict[str, Any] | None = None,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
) -> Any:
    """GET (or POST `body`) and decode the JSON answer; raises on non-2xx."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def http_text(url: str, timeout: float = 10) -> str:
    """The body of a GET as text; raises on non-2xx."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body.decode()


def worker_routed(port: int) -> float:
    """What a worker's metrics say it routed so far (0 when it has not answered yet)."""
    try:
        text = http_text(f"http://127.0.0.1:{port}/metrics", timeout=2)
    except OSError:
        return 0.0
    found = re.search(r'sluice_processor_events_total\{[^}]*outcome="routed"[^}]*\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


JOB_WORKERS = ("jobs", "jobs2", "jobs3")
# Every pipeline made, so that a test's fixtures can stop the services it left running.
LIVE: list[Pipeline] = []


@dataclass
class Pipeline:
    """Gateway, worker and sink of one test, with their own topics, group ids and warehouse."""

    root: Path
    bootstrap: str
    prefix: str
    write_key: str = "test-key"
    # The bearer token of the sink's query endpoint.
    query_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    env: dict[str, str] = field(default_factory=dict)
    config: str = CONFIG
    # Settings of one service only, over `env` (its Kafka login, say).
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        LIVE.append(self)
        self.gateway_port = free_port()
        self.query_port = free_port()
        self.delivery_port = free_port()
        self.worker_metrics_port = free_port()
        self.orchestrator_port = free_port()
        self.registry_port = free_port()
        config = self.root / "sluice.yaml"
        config.write_text(self.config.replace(KEY, self.write_key))
        self.env = {
            "SLUICE_CONFIG_FILE": str(config),
            "SLUICE_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "SLUICE_KAFKA_TOPIC_PREFIX": self.prefix,
            "SLUICE_GATEWAY_PORT": str(self.gateway_port),
            "SLUICE_WORKER_APP_ID": f"{self.prefix}-processor",
            "SLUICE_WORKER_DATA_DIR": str(self.root / "worker"),
            "SLUICE_WORKER_METRICS_PORT": str(self.worker_metrics_port),
            "SLUICE_WAREHOUSE_DSN": f"chdb://{self.root / 'warehouse'}",
            "SLUICE_WAREHOUSE_QUERY_PORT": str(self.query_port),
            "SLUICE_WAREHOUSE_QUERY_TOKEN": self.query_token,
            "SLUICE_WAREHOUSE_CONSUMER_GROUP": f"{self.prefix}-sink",
            "SLUICE_WAREHOUSE_BATCH_SECONDS": "0.5",
            "SLUICE_DELIVERY_PORT": str(self.delivery_port),
            "SLUICE_DELIVERY_CONSUMER_GROUP": f"{self.prefix}-delivery",
            "SLUICE_JOBS_CONSUMER_GROUP": f"{self.prefix}-jobs",
            "SLUICE_JOBS_MODULES": "tests.job_functions,connectors.jobs.builtin",
            "SLUICE_JOBS_SESSION_TIMEOUT_MS": "6000",
            "SLUICE_WORKFLOWS_PORT": str(self.orchestrator_port),
            "SLUICE_REGISTRY_PORT": str(self.registry_port),
            # The tests' transforms are the only ones a test's services may import.
            "SLUICE_TRANSFORM_MODULES": "tests.transforms",
            **self.env,
        }
        # Job workers: `jobs`, `jobs2` and `jobs3`, each with its own probe port.
        self.job_ports = {name: free_port() for name in JOB_WORKERS}
        self.services = {
            name: BackgroundProcess(name, self.root / "run")
            for name in (
                "gateway",
                "worker",
                "sink",
                "deliver",
                "orchestrator",
                "registry",
                *JOB_WORKERS,
            )
        }
        # `start()` runs the delivery process only when there is something to deliver.
        cfg = parse_config(self.config.replace(KEY, self.write_key))
        self.defaults = ("gateway", "worker", "sink") + (
            ("deliver",) if any(d.type == "webhook" for d in cfg.destinations) else ()
        )

    @property
    def gateway_url(self) -> str:
        """Base URL of the gateway."""
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self, *names: str, wait_ready: bool = True) -> None:
        """Start services (by default those the config needs) and wait until they answer
        (the gateway: until it is ready, unless `wait_ready` is False)."""
        names = names or self.defaults
        for name in names:
            env = self.env | self.service_env.get(name, {})
            if name in self.job_ports:
                env |= {"SLUICE_JOBS_PORT": str(self.job_ports[name])}
                self.services[name].start(["jobs", "work"], env)
            elif name == "orchestrator":
                self.services[name].start(["workflow", "orchestrate"], env)
            else:
                self.services[name].start([name], env)
        for name in names:
            if name in self.job_ports:
                self._wait(f"http://127.0.0.1:{self.job_ports[name]}/health", name)
        if "sink" in names:
            self._wait(f"http://127.0.0.1:{self.query_port}/health", "sink")
        if "orchestrator" in names:
            self._wait(f"http://127.0.0.1:{self.orchestrator_port}/ready", "orchestrator")
        if "registry" in names:
            self._wait(f"http://127.0.0.1:{self.registry_port}/subjects", "registry")
        if "deliver" in names:
            self._wait(f"http://127.0.0.1:{self.delivery_port}/health", "deliver")
        if "gateway" in names:
            # Ready: the config and the job statuses read (the jobs API answers 503 before).
            self._wait(f"{self.gateway_url}/{'ready' if wait_ready else 'health'}", "gateway")

    def stop(self, *names: str) -> None:
        """SIGTERM services (all by default) and wait for them to exit."""
        for name in names or tuple(self.services):
            self.services[name].stop(timeout=60)

    def pid(self, name: str) -> int:
        """The pid of a running service."""
        pid = self.services[name].pid()
        assert pid is not None, f"{name} is not running:\n{self.services[name].tail()}"
        return pid

    def _wait(self, url: str, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.services[name].pid() is None:
                raise AssertionError(f"{name} exited:\n{self.services[name].tail(40)}")
            try:
                http_json(url, timeout=2)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise AssertionError(f"{name} did not answer {url}:\n{self.services[name].tail(40)}")

    def query(self, sql: str) -> list[list[Any]]:
        """Rows of a read-only query, through the sink's query endpoint."""
        body = http_json(
            f"http://127.0.0.1:{self.query_port}/query",
            {"sql": sql},
            headers={"Authorization": f"Bearer {self.query_token}"},
        )
        rows: list[list[Any]] = body["rows"]
        return rows

    def wait_rows(self, expected: int, timeout: float = 120) -> int:
        """Wait until the events table holds `expected` rows (or time runs out); the count."""
        deadline = time.monotonic() + timeout
        count = -1
        while time.monotonic() < deadline:
            count = int(self.query("SELECT count() FROM events")[0][0])
            if count >= expected:
                # A little longer, so that rows arriving late (duplicates) are seen too.
                time.sleep(1.5)
                return int(self.query("SELECT count() FROM events")[0][0])
            time.sleep(0.5)
        return count


def pipeline_with_topics(root: Path, bootstrap: str, prefix: str, config: str = CONFIG) -> Pipeline:
    """A Pipeline whose config's topics exist."""
    pipe = Pipeline(root, bootstrap, prefix, config=config)
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    apply_topics(required_topics(parse_config(config.replace(KEY, pipe.write_key)), kafka), kafka)
    return pipe


@contextlib.asynccontextmanager
async def webhook_receiver(
    port: int, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> AsyncIterator[str]:
    """Serve `handler` at http://127.0.0.1:`port`/hook while the block runs; yields the URL."""
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def http_receiver(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    paths: tuple[str, ...] = ("/hook",),
) -> AsyncIterator[int]:
    """A receiver on 127.0.0.1 (a port of its own) answering POSTs to `paths`."""
    web_app = web.Application()
    for path in paths:
        web_app.router.add_post(path, handler)
    runner = web.AppRunner(web_app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


def probe(port: int, path: str = "/ready") -> tuple[int, dict[str, Any]]:
    """Status and body of a process's `/ready` (or `path`); 0 while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def envelope_records(
    messages: list[dict[str, Any]], source: str = "test-src"
) -> list[tuple[bytes, bytes, None]]:
    """SDK messages as the processor writes them to a destination topic (key, Avro value)."""
    from gateway.envelope import build_event  # noqa: PLC0415
    from schemas.codec import event_codec  # noqa: PLC0415

    codec = event_codec()
    now = int(time.time() * 1000)
    return [
        (
            f"{source}:{m.get('userId') or m.get('anonymousId')}".encode(),
            codec.encode(build_event(m, source, now)),
            None,
        )
        for m in messages
    ]


def produce(
    kafka: Any, topic: str, records: Sequence[tuple[bytes | None, bytes, Any]], partition: int = -1
) -> None:
    """Produce `records` (key, value, headers) and wait until Kafka confirmed every one."""
    from confluent_kafka import Producer  # noqa: PLC0415

    producer = Producer(kafka.client_config() | {"enable.idempotence": True, "acks": "all"})
    failed: list[str] = []
    for key, value, headers in records:
        producer.produce(
            topic,
            value,
            key,
            partition=partition,
            headers=headers,
            on_delivery=lambda err, _m: failed.append(err.str()) if err else None,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not failed, failed[:1]


def read_records(kafka: Any, topic: str) -> list[Any]:
    """Every record of `topic` now (confluent-kafka messages), in partition order."""
    from ops.dlq import read_topic  # noqa: PLC0415

    return list(read_topic(kafka, topic))


def group_lag(kafka: Any, group: str, topics: list[str]) -> int:
    """Records of `topics` that consumer group `group` has not committed yet."""
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

    consumer = Consumer(kafka.client_config() | {"group.id": group})
    try:
        parts = [
            TopicPartition(t, p)
            for t in topics
            for p in consumer.list_topics(t, timeout=10).topics[t].partitions
        ]
        lag = 0
        for tp in consumer.committed(parts, timeout=10):
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            lag += high - max(tp.offset, 0)
        return lag
    finally:
        consumer.close()


async def until(check: Callable[[], object], within: float, what: str = "the condition") -> None:
    """Wait until `check()` (run in a thread: it may block) is true; fail after `within` s."""
    import asyncio  # noqa: PLC0415

    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within}s")
        await asyncio.sleep(0.5)


class Usurper:
    """A second group member with a sink's static instance id, which fences the sink.

    Like a second sink started by mistake, it joins again each time it is fenced itself,
    so the sink's own rejoins (a fencing after a broker failover can be spurious) run out.
    """

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self._config = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "group.instance.id": f"{group}-embedded",
            "session.timeout.ms": 10_000,
            "partition.assignment.strategy": "cooperative-sticky",
        }
        self._topic = topic
        self._member = self._join()

    def _join(self) -> Consumer:
        member = Consumer(self._config)
        member.subscribe([self._topic])
        return member

    def poll(self, timeout: float = 0.5) -> None:
        msg = self._member.poll(timeout)
        err = None if msg is None else msg.error()
        if err is not None and (err.fatal() or err.code() == KafkaError._FATAL):
            self._member.close()
            self._member = self._join()

    def close(self) -> None:
        self._member.close()
