"""Authenticated mode: a broker of the test's own with SASL/SCRAM users per role and ACLs.

Every service logs in as its own role's user and has only that role's ACLs (core/acls.py);
the admin user (a super user) creates the topics, the ACLs, the config and the playbooks.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from core.acls import Names, apply_acls, bindings
from core.admin import apply_topics
from core.config import parse_config
from core.settings import BrokerSettings, KafkaSettings
from core.topics import required_topics
from ops.baseline_services import BASE_DIR
from ops.cli_workflows import apply_playbook
from ops.kafka_broker import client_config, credentials, role_env, start_broker, stop_broker
from ops.traffic import sample_events, send_batches
from tests.configs import KEY, Configs
from tests.jobs_api import BEARER, status_of
from tests.pipeline import Pipeline, free_port, free_ports, http_json, until, webhook_receiver
from tests.workflows_api import RUN_KEY, playbook, shown, start_run, wait_run

pytestmark = pytest.mark.integration

# The pipeline service each role runs as.
SERVICE_ROLES = {
    "gateway": "gateway",
    "worker": "worker",
    "sink": "sink",
    "deliver": "delivery",
    "jobs": "jobs",
    "registry": "registry",
    "orchestrator": "workflows",
}


@pytest.fixture(scope="module")
def secured() -> Iterator[BrokerSettings]:
    base = free_ports(2)
    state = (BASE_DIR / f"sasl-{uuid.uuid4().hex[:8]}").resolve()
    settings = BrokerSettings(
        port=base, controller_port=base + 1, state_dir=state, heap="512m", sasl=True
    )
    start_broker(settings)
    try:
        yield settings
    finally:
        stop_broker(settings)
        shutil.rmtree(state, ignore_errors=True)


def _kafka(settings: BrokerSettings, prefix: str, role: str = "admin") -> KafkaSettings:
    env = role_env(settings, role)
    return KafkaSettings(
        bootstrap_servers=env["SLUICE_KAFKA_BOOTSTRAP_SERVERS"],
        topic_prefix=prefix,
        security_protocol=env["SLUICE_KAFKA_SECURITY_PROTOCOL"],
        sasl_mechanism=env["SLUICE_KAFKA_SASL_MECHANISM"],
        sasl_username=env["SLUICE_KAFKA_SASL_USERNAME"],
        sasl_password=SecretStr(env["SLUICE_KAFKA_SASL_PASSWORD"]),
    )


def _secured_pipeline(settings: BrokerSettings, root: Path, config: str) -> Pipeline:
    """A pipeline whose topics and ACLs the admin made; each service logs in as its role."""
    prefix = f"a{uuid.uuid4().hex[:8]}"
    pipe = Pipeline(
        root, role_env(settings, "admin")["SLUICE_KAFKA_BOOTSTRAP_SERVERS"], prefix, config=config
    )
    admin = _kafka(settings, prefix)
    cfg = parse_config(config.replace(KEY, pipe.write_key))
    env = pipe.env
    names = Names(
        processor=env["SLUICE_WORKER_APP_ID"],
        sink_group=env["SLUICE_WAREHOUSE_CONSUMER_GROUP"],
        delivery_group=env["SLUICE_DELIVERY_CONSUMER_GROUP"],
        jobs_group=env["SLUICE_JOBS_CONSUMER_GROUP"],
    )
    apply_topics(required_topics(cfg, admin), admin)
    apply_acls(admin, bindings(cfg, admin, names))
    pipe.service_env = {svc: role_env(settings, role) for svc, role in SERVICE_ROLES.items()}
    return pipe


def test_a_client_without_credentials_or_with_a_wrong_password_is_refused(
    secured: BrokerSettings,
) -> None:
    anonymous = AdminClient(
        {
            "bootstrap.servers": role_env(secured, "admin")["SLUICE_KAFKA_BOOTSTRAP_SERVERS"],
            "log_level": 0,
        }
    )
    with pytest.raises(KafkaException):
        anonymous.list_topics(timeout=5)
    wrong = AdminClient(client_config(secured, "gateway") | {"sasl.password": "guess"})
    with pytest.raises(KafkaException):
        wrong.list_topics(timeout=5)
    # The right password of the same user is let in: the refusals above are the login's.
    assert AdminClient(client_config(secured, "gateway")).list_topics(timeout=10) is not None
    assert credentials(secured)["gateway"] != credentials(secured)["admin"]


def _produce_error(conf: dict[str, str | int | float | bool], topic: str) -> KafkaError | None:
    errors: list[KafkaError | None] = []
    producer = Producer(conf | {"message.timeout.ms": 10_000})
    producer.produce(topic, b"value", key=b"key", on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(15)
    assert errors, "no delivery report"
    return errors[0]


def _read(conf: dict[str, str | int | float | bool], topic: str) -> bytes | KafkaError:
    """The first record of `topic`, or the error that refused the read."""
    errors: list[KafkaError] = []
    consumer = Consumer(
        conf
        | {
            "group.id": f"sluice-config-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "error_cb": errors.append,
        }
    )
    try:
        consumer.subscribe([topic])
        for _ in range(60):
            msg = consumer.poll(0.25)
            err = None if msg is None else msg.error()
            if err is not None:
                return err
            if msg is not None:
                return msg.value() or b""
            if errors:
                return errors[0]
        raise AssertionError(f"neither a record nor an error from {topic}")
    finally:
        consumer.close()


def test_the_gateways_user_cannot_write_the_config_or_read_a_destination(
    secured: BrokerSettings, tmp_path: Path
) -> None:
    configs = Configs()
    pipe = _secured_pipeline(secured, tmp_path, configs.text(configs.warehouse()))
    gateway, admin = client_config(secured, "gateway"), client_config(secured, "admin")
    config_topic, dest = f"{pipe.prefix}.config", f"{pipe.prefix}.dest.warehouse"
    refused = _produce_error(gateway, config_topic)
    assert refused is not None
    assert refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # What the gateway does write, it may: the refusal is the ACL's, not the login's.
    assert _produce_error(gateway, f"{pipe.prefix}.events.ingest") is None
    # Only the admin writes the config.
    assert _produce_error(admin, config_topic) is None
    assert _produce_error(client_config(secured, "worker"), config_topic) is not None
    # A destination's events: the sink reads them, the gateway may not.
    assert _produce_error(admin, dest) is None
    denied = _read(gateway, dest)
    assert isinstance(denied, KafkaError)
    assert denied.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert _read(client_config(secured, "sink"), dest) == b"value"


async def test_end_to_end_with_every_service_on_its_own_role(
    secured: BrokerSettings, tmp_path: Path
) -> None:
    configs = Configs()
    port = free_port()
    hooked: set[str] = set()

    async def hook(request: web.Request) -> web.Response:
        hooked.add((await request.json())["messageId"])
        return web.Response(status=200)

    queues = [
        configs.queue(
            "workflows",
            keys=(),
            priorities=1,
            partitions=2,
            max_attempts=1,
            executor={"type": "python", "function": "connectors.workflows.tools:run_step"},
        ),
        configs.queue(
            "echo",
            priorities=1,
            partitions=2,
            executor={"type": "python", "function": "connectors.jobs.builtin:echo"},
        ),
    ]
    config = configs.text(
        configs.warehouse(),
        configs.webhook(f"http://127.0.0.1:{port}/hook", retry={"tiers": ["1s"]}),
        queues=queues,
        workflows={"run_keys": [RUN_KEY]},
    )
    pipe = _secured_pipeline(secured, tmp_path, config)
    pipe.env["SLUICE_JOBS_MODULES"] = "connectors.jobs.builtin,connectors.workflows.tools"
    names = ("gateway", "worker", "sink", "deliver", "jobs", "orchestrator", "registry")
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start, *names)
        try:
            events = sample_events(200, seed=31)
            report = await send_batches(pipe.gateway_url, pipe.write_key, events)
            assert report.accepted == 200, report.statuses
            assert await asyncio.to_thread(pipe.wait_rows, 200) == 200
            assert pipe.query("SELECT count(), uniqExact(event_id) FROM events") == [[200, 200]]
            await until(lambda: len(hooked) == 200, 60, "every event delivered to the webhook")

            # A job through the gateway, run by the job worker, its result read back.
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{pipe.gateway_url}/v1/jobs",
                    json={"queue": "echo", "payload": {"n": 5}},
                    headers=BEARER,
                ) as resp,
            ):
                assert resp.status == 202, await resp.text()
                job_id = (await resp.json())["id"]

            def done() -> bool:
                status = status_of(pipe, job_id)  # None until the gateway read its first
                return status is not None and status["state"] == "COMPLETED"

            await until(done, 60, "the job completed")

            # A playbook (applied by the admin) run by the orchestrator and the step runner.
            text = playbook(
                "tests/auth",
                [
                    {
                        "step": "start",
                        "tool": {"kind": "job", "queue": "echo", "payload": {"n": "{{ n }}"}},
                    },
                ],
                {"n": 1},
            )
            await asyncio.to_thread(apply_playbook, _kafka(secured, pipe.prefix), text)
            eid = await asyncio.to_thread(start_run, pipe, "tests/auth", {"n": 3})
            run = await asyncio.to_thread(wait_run, pipe, eid)
            assert run["status"] == "COMPLETED", shown(run)
            assert run["steps"]["start"]["result"] == {"n": 3}

            # The registry, on its own user, wrote and read back its built-in subjects.
            subjects = http_json(f"http://127.0.0.1:{pipe.registry_port}/subjects")
            assert f"{pipe.prefix}.events.ingest-value" in subjects
            for svc in names:
                assert pipe.services[svc].pid() is not None, pipe.services[svc].tail(30)
        finally:
            await asyncio.to_thread(pipe.stop)
