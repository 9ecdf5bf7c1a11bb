"""The built-in schema registry: compatibility rules, and Confluent's own clients against it."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from core.admin import apply_topics
from core.settings import KafkaSettings, TransformSettings
from core.topics import Topics, required_topics
from ops.processes import BackgroundProcess
from ops.traffic import sample_events
from schemas.codec import event_codec, load_schema
from streams.processor import Incoming, Router
from tests.configs import Configs
from tests.orders import NO_DEFAULT, V1, V2
from tests.pipeline import free_port

NO_TRANSFORMS = TransformSettings(modules=())


WRITER = ("schemas-ci", "s3cret-for-tests")


USER_INFO = ":".join(WRITER)


@pytest.fixture
def registry(
    configs: Configs, kafka: KafkaSettings, tmp_path: Path
) -> Iterator[tuple[str, BackgroundProcess, dict[str, str]]]:
    cfg = configs.model(configs.warehouse("wh", sources=["web"]), sources=[configs.source("web")])
    apply_topics(required_topics(cfg, kafka), kafka)
    port = free_port()
    env = {
        "SLUICE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SLUICE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "SLUICE_REGISTRY_PORT": str(port),
        "SLUICE_REGISTRY_WRITE_USER": WRITER[0],
        "SLUICE_REGISTRY_WRITE_PASSWORD": WRITER[1],
    }
    service = BackgroundProcess("registry", tmp_path)
    url = f"http://127.0.0.1:{port}"
    _start(service, env, url)
    try:
        yield url, service, env
    finally:
        service.stop()


def _start(service: BackgroundProcess, env: dict[str, str], url: str) -> None:
    service.start(["registry"], env)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"the registry did not start: {service.log_file.read_text()[-2000:]}")
            time.sleep(0.3)


@pytest.mark.integration
def test_confluent_clients_use_it(
    registry: tuple[str, BackgroundProcess, dict[str, str]], kafka: KafkaSettings
) -> None:
    url, service, env = registry
    with SchemaRegistryClient({"url": url, "basic.auth.user.info": USER_INFO}) as client:
        second = _use_registry(client, kafka)
    assert _error(f"{url}/subjects/nope/versions") == (404, 40401)
    assert _error(f"{url}/subjects/x/versions", {"schema": "{oops"}, auth=WRITER) == (422, 42201)
    assert _error(f"{url}/schemas/ids/999") == (404, 40403)
    assert _error(f"{url}/config", {"compatibility": "SOMETIMES"}, "PUT", WRITER) == (422, 42203)
    # Restarted, the registry rebuilds the same ids and versions from its log.
    service.stop()
    _start(service, env, url)
    with SchemaRegistryClient({"url": url, "basic.auth.user.info": USER_INFO}) as again:
        assert again.get_versions("orders-value") == [1, 2]
        assert again.get_schema(second).schema_str == json.dumps(V2, separators=(",", ":"))
        assert again.register_schema("orders-value", Schema(json.dumps(V2), "AVRO")) == second


def _error(
    url: str,
    body: Any = None,
    method: str | None = None,
    auth: tuple[str, str] | None = None,
    challenge: list[str] | None = None,
) -> tuple[int, int]:
    """The HTTP status and Confluent error code of a request that must fail.

    With `challenge`, the response's `WWW-Authenticate` header is appended to it.
    """
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/vnd.schemaregistry.v1+json")
    if auth is not None:
        req.add_header("Authorization", basic_auth(*auth))
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as exc:
        with exc:
            if challenge is not None:
                challenge.append(exc.headers.get("WWW-Authenticate", ""))
            return exc.code, json.loads(exc.read())["error_code"]
    pytest.fail(f"{url} did not fail")


def basic_auth(user: str, password: str) -> str:
    """An `Authorization` header value for HTTP Basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.integration
def test_writes_need_the_credential(
    registry: tuple[str, BackgroundProcess, dict[str, str]], kafka: KafkaSettings
) -> None:
    url, _service, _env = registry
    with SchemaRegistryClient({"url": url, "basic.auth.user.info": USER_INFO}) as writer:
        first = writer.register_schema("orders-value", Schema(json.dumps(V1), "AVRO"))
    v2 = {"schema": json.dumps(V2)}
    wrong = (WRITER[0], WRITER[1] + "x")
    writes: list[tuple[str, Any, str]] = [
        (f"{url}/subjects/orders-value/versions", v2, "POST"),
        (f"{url}/subjects/fresh-value/versions", v2, "POST"),
        (f"{url}/config", {"compatibility": "NONE"}, "PUT"),
        (f"{url}/config/orders-value", {"compatibility": "NONE"}, "PUT"),
        (f"{url}/subjects/orders-value", None, "DELETE"),
        (f"{url}/subjects/orders-value/versions/1", None, "DELETE"),
        (f"{url}/mode", {"mode": "IMPORT"}, "PUT"),
    ]
    for auth in (None, wrong, ("someone", WRITER[1]), ("", "")):
        for target, body, method in writes:
            challenge: list[str] = []
            assert _error(target, body, method, auth, challenge) == (401, 401), (target, auth)
            assert challenge == ['Basic realm="sluice-registry", charset="UTF-8"']
    # Confluent's client without credentials, and with wrong ones: refused, not retried.
    for conf in ({"url": url}, {"url": url, "basic.auth.user.info": ":".join(wrong)}):
        with SchemaRegistryClient(conf) as anonymous:
            with pytest.raises(SchemaRegistryError) as refused:
                anonymous.register_schema("orders-value", Schema(json.dumps(V2), "AVRO"))
            assert refused.value.http_status_code == 401
            with pytest.raises(SchemaRegistryError) as refused:
                anonymous.set_compatibility("orders-value", "NONE")
            assert refused.value.http_status_code == 401
            # Reads stay open.
            assert anonymous.get_versions("orders-value") == [1]
            assert anonymous.get_schema(first).schema_str == json.dumps(V1, separators=(",", ":"))
            no_default = Schema(json.dumps(NO_DEFAULT), "AVRO")
            assert anonymous.test_compatibility("orders-value", no_default) is False
    # Nothing changed: one version, no new subject, the default level.
    with SchemaRegistryClient({"url": url}) as reader:
        envelope = f"{kafka.topic_prefix}.events.ingest-value"
        jobs = f"{kafka.topic_prefix}.jobs-value"
        assert set(reader.get_subjects()) == {"orders-value", envelope, jobs}
        assert reader.get_versions("orders-value") == [1]
        assert reader.get_compatibility() == "BACKWARD"
    # With the credential, the same writes work.
    with SchemaRegistryClient({"url": url, "basic.auth.user.info": USER_INFO}) as writer:
        assert writer.set_compatibility("orders-value", "NONE") == {"compatibility": "NONE"}
        second = writer.register_schema("orders-value", Schema(json.dumps(NO_DEFAULT), "AVRO"))
        assert writer.get_versions("orders-value") == [1, 2]
        assert second != first


@pytest.mark.integration
def test_without_a_configured_password_nothing_may_write(
    configs: Configs, kafka: KafkaSettings, tmp_path: Path
) -> None:
    apply_topics(required_topics(configs.model(sources=[]), kafka), kafka)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = BackgroundProcess("registry", tmp_path)
    _start(
        service,
        {
            "SLUICE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "SLUICE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
            "SLUICE_REGISTRY_PORT": str(port),
        },
        url,
    )
    try:
        body = {"schema": json.dumps(V1)}
        for auth in (None, ("sluice", ""), WRITER):
            assert _error(f"{url}/subjects/o-value/versions", body, "POST", auth) == (403, 40301)
        with SchemaRegistryClient({"url": url}) as reader:
            assert "o-value" not in reader.get_subjects()
            assert reader.get_schema(1).schema_str is not None  # the envelope, registered
    finally:
        service.stop()


def _use_registry(client: SchemaRegistryClient, kafka: KafkaSettings) -> int:
    # The envelope is id 1 from the start: records framed before anyone registered decode.
    envelope = client.get_schema(1).schema_str
    assert envelope is not None
    assert json.loads(envelope) == load_schema("event")
    # The job submission is id 2, for any Kafka client that produces jobs.
    job = client.get_schema(2).schema_str
    assert job is not None
    assert json.loads(job) == load_schema("job")
    first = client.register_schema("orders-value", Schema(json.dumps(V1), "AVRO"))
    second = client.register_schema("orders-value", Schema(json.dumps(V2), "AVRO"))
    assert first != second
    assert first not in (1, 2, second)
    assert client.get_versions("orders-value") == [1, 2]
    assert client.get_latest_version("orders-value").schema_id == second
    assert (
        client.test_compatibility("orders-value", Schema(json.dumps(NO_DEFAULT), "AVRO")) is False
    )
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema("orders-value", Schema(json.dumps(NO_DEFAULT), "AVRO"))
    assert refused.value.http_status_code == 409
    assert "currency" in refused.value.error_message

    # Records on a destination topic, as the processor routes them, decode with
    # confluent-kafka's own AvroDeserializer pointed at this registry.
    topics = Topics(kafka.topic_prefix)
    dest = topics.destination("wh").main
    configs = Configs()
    cfg = configs.model(configs.warehouse("wh", sources=["web"]), sources=[configs.source("web")])
    codec = event_codec()
    from gateway.envelope import build_event  # noqa: PLC0415

    events = [build_event(m, "web", 1_795_389_209_123) for m in sample_events(20, seed=4)]
    incoming = [
        Incoming(e["user_id"].encode(), codec.encode(e), topics.ingest, 0, i, 0)
        for i, e in enumerate(events)
    ]
    routed = Router(cfg, topics, event_codec(logical_types=False), NO_TRANSFORMS).route(incoming)
    producer = Producer(kafka.client_config())
    for key, value, _ in routed.outputs[dest]:
        producer.produce(dest, value, key)
    assert producer.flush(10) == 0
    consumer = Consumer(
        kafka.client_config() | {"group.id": f"{dest}-avro", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([dest])
    decoded: list[Any] = []
    deserialize = AvroDeserializer(client)
    deadline = time.monotonic() + 20
    while len(decoded) < len(events) and time.monotonic() < deadline:
        for msg in consumer.consume(50, timeout=0.5):
            if msg.error() is None:
                decoded.append(
                    deserialize(msg.value(), SerializationContext(dest, MessageField.VALUE))
                )
    consumer.close()
    by_id = {e["event_id"]: e for e in decoded}
    assert len(by_id) == len(events)
    for event in events:
        assert by_id[event["event_id"]] == codec.decode(codec.encode(event))

    return second
