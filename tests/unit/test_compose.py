"""docker-compose.kafka.yml: the services exist, images are pinned, settings names are real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from core.settings import env_names

COMPOSE = Path(__file__).parents[2] / "docker-compose.kafka.yml"
BROKERS = ("kafka-1", "kafka-2", "kafka-3")
# Each long-running Sluice service and the Kafka user (its role, core/acls.py) it logs in as.
SERVICE_USERS = {
    "gateway": "gateway",
    "worker": "worker",
    "sink": "sink",
    "deliver": "delivery",
    "jobs": "jobs",
    "orchestrator": "workflows",
    "registry": "registry",
}


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def test_the_stack_has_broker_warehouse_and_every_sluice_role() -> None:
    services = _services()
    roles = (*SERVICE_USERS, "kafka-users", "topics", "acls")
    assert {*BROKERS, "clickhouse", *roles} <= set(services)
    commands = {name: services[name]["command"] for name in roles}
    assert commands == {
        "kafka-users": ["kafka", "users", "apply"],
        "topics": ["topics", "apply"],
        "acls": ["kafka", "acls", "apply"],
        "registry": ["registry"],
        "gateway": ["gateway"],
        "worker": ["worker"],
        "sink": ["sink"],
        "deliver": ["deliver"],
        "jobs": ["jobs", "work"],
        "orchestrator": ["workflow", "orchestrate"],
    }


def test_images_are_pinned() -> None:
    for name, service in _services().items():
        image = service.get("image")
        assert image, f"{name} has no image"
        repo, _, tag = image.rpartition(":")
        assert repo, f"{name}: {image} has no tag"
        assert tag not in ("", "latest"), f"{name}: {image} is not pinned"


def test_sluice_environment_names_match_the_settings_models() -> None:
    known = env_names()
    for name, service in _services().items():
        env = service.get("environment") or {}
        unknown = {k for k in env if k.startswith("SLUICE_") and k not in known}
        assert not unknown, f"{name} sets unknown settings {unknown}"


def test_sluice_services_reach_the_broker_and_warehouse_by_service_name() -> None:
    services = _services()
    for name in (*SERVICE_USERS, "kafka-users", "topics", "acls"):
        bootstrap = services[name]["environment"]["SLUICE_KAFKA_BOOTSTRAP_SERVERS"].split(",")
        # Every broker, so that any one of them may be down when a service starts.
        assert len(bootstrap) == len(BROKERS)
        for node, address in zip(BROKERS, bootstrap, strict=True):
            listeners = services[node]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
            assert f"INTERNAL://{address}" in listeners.split(",")
        assert services[name]["depends_on"]
    assert services["sink"]["environment"]["SLUICE_WAREHOUSE_DSN"] == "http://clickhouse:8123"
    assert services["gateway"]["environment"]["SLUICE_GATEWAY_HOST"] == "0.0.0.0"


def test_prometheus_scrapes_every_sluice_role_on_an_address_it_can_reach() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    scrape = yaml.safe_load(compose["configs"]["prometheus"]["content"])["scrape_configs"]
    targets = {t for job in scrape for conf in job["static_configs"] for t in conf["targets"]}
    assert targets == {
        "gateway:8080",
        "sink:8124",
        "deliver:8125",
        "worker:9464",
        "jobs:8126",
        "orchestrator:8127",
    }
    env = {name: s.get("environment") or {} for name, s in compose["services"].items()}
    # Each listens on all interfaces: 127.0.0.1 inside a container is unreachable from others.
    assert env["gateway"]["SLUICE_GATEWAY_HOST"] == "0.0.0.0"
    assert env["sink"]["SLUICE_WAREHOUSE_QUERY_HOST"] == "0.0.0.0"
    assert env["deliver"]["SLUICE_DELIVERY_HOST"] == "0.0.0.0"
    assert env["worker"]["SLUICE_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert env["jobs"]["SLUICE_JOBS_HOST"] == "0.0.0.0"
    assert env["orchestrator"]["SLUICE_WORKFLOWS_HOST"] == "0.0.0.0"
    # The job worker runs warehouse steps against the sink's query endpoint.
    assert env["jobs"]["SLUICE_WAREHOUSE_QUERY_HOST"] == "sink"


def test_only_the_gateway_is_published_beyond_this_host_and_no_password_is_written_in() -> None:
    services = _services()
    published = {
        name: port for name, service in services.items() for port in service.get("ports", [])
    }
    open_ports = {name for name, port in published.items() if not port.startswith("127.0.0.1:")}
    assert open_ports == {"gateway"}
    text = COMPOSE.read_text()
    assert "PASSWORD: sluice" not in text
    assert services["clickhouse"]["environment"]["CLICKHOUSE_PASSWORD"].startswith("${")


def test_the_image_has_the_spawn_server_next_to_its_python() -> None:
    # The command executor looks for sluice-launch next to the Python that runs Sluice
    # (/usr/local/bin in the python image) and fails its queues without it.
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert "gcc -O2 -Wall -Wextra -static -o /out/sluice-launch sluice-launch.c" in dockerfile
    assert "COPY --from=native /out/sluice-launch /usr/local/bin/sluice-launch" in dockerfile
    python = next(line for line in dockerfile.splitlines() if line.startswith("FROM python:"))
    assert dockerfile.index(python) < dockerfile.index("COPY --from=native /out/sluice-launch")


def test_three_brokers_replicate_everything_three_times_and_a_write_needs_two() -> None:
    services = _services()
    ids = set()
    for node in BROKERS:
        env = services[node]["environment"]
        ids.add(env["KAFKA_NODE_ID"])
        assert len(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == len(BROKERS)
        for key in (
            "KAFKA_DEFAULT_REPLICATION_FACTOR",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        ):
            assert env[key] == 3, f"{node} {key}"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == 2
        assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == 2
        assert services["kafka-users"]["depends_on"][node] == {"condition": "service_healthy"}
    assert ids == {1, 2, 3}


def test_no_listener_takes_a_client_without_a_login_and_acls_decide() -> None:
    for node in BROKERS:
        env = _services()[node]["environment"]
        protocols = {
            pair.split(":")[1] for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
        }
        assert protocols == {"SASL_PLAINTEXT"}
        assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
        assert env["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
        assert env["KAFKA_SUPER_USERS"] == "User:broker;User:admin"


def test_every_service_logs_in_as_its_own_role_and_only_one_shots_as_admin() -> None:
    services = _services()
    for name, user in SERVICE_USERS.items():
        env = services[name]["environment"]
        assert env["SLUICE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512", name
        assert env["SLUICE_KAFKA_SASL_USERNAME"] == user, name
        variable = f"SLUICE_KAFKA_USERS_{user.upper()}_PASSWORD"
        assert env["SLUICE_KAFKA_SASL_PASSWORD"].startswith(f"${{{variable}:?"), name
        # The user is made with that same password.
        assert services["kafka-users"]["environment"][variable] == env["SLUICE_KAFKA_SASL_PASSWORD"]
        assert services[name]["depends_on"]["acls"] == {
            "condition": "service_completed_successfully"
        }
    admins = {
        name
        for name, service in services.items()
        if (service.get("environment") or {}).get("SLUICE_KAFKA_SASL_USERNAME") == "admin"
    }
    assert admins == {"kafka-users", "topics", "acls"}
