"""The config topic is data, not code: a record naming a transform module outside
`SLUICE_TRANSFORM_MODULES`, one whose module raises `SystemExit` on import, one that is
not JSON: each refused and reported (log and `sluice_config_refused_total`), the config in
use kept, and a later valid config (a new write key, a revoked one, a new destination)
still applied, by the real follower in real gateway and worker processes."""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
import yaml
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from core.admin import apply_topics
from core.config import PipelineConfig, parse_config
from core.config_topic import KEY, ConfigFollower
from core.settings import KafkaSettings, TransformSettings
from core.topics import Topics, required_topics
from ops.traffic import basic_auth
from tests.configs import Configs
from tests.pipeline import Pipeline, http_text

pytestmark = pytest.mark.integration


def _config(keys: str, function: str | None = None) -> str:
    """A config with this write key, and with `function` an `audit` destination running it."""
    configs = Configs()
    destinations = [configs.warehouse(retry={"tiers": ["1s", "3s"], "max_attempts": 3})]
    if function is not None:
        audit = {"table": "audit_events", "layout": False}
        transform = {"function": function}
        destinations.append(configs.warehouse("audit", settings=audit, transform=transform))
    return configs.text(*destinations, sources=[configs.source(keys=[keys])])


def _record(keys: str, function: str | None = None) -> bytes:
    """A config record with these write keys, and an `audit` destination with `function`.

    Written as JSON straight from the YAML: nothing validates (or imports) it on the way.
    """
    return orjson.dumps(yaml.safe_load(_config(keys, function)))


def _publish(kafka: KafkaSettings, value: bytes) -> None:
    """Write a raw record to the config topic, as anything with access to the topic could."""
    producer = Producer(kafka.client_config())
    producer.produce(Topics(kafka.topic_prefix).config, value, KEY)
    assert producer.flush(10) == 0


def _exit_on_import(root: Path) -> str:
    """A package under `root` whose module `mod` raises SystemExit on import; its name.

    The import touches `<root>/<name>.imported` first, to show that it did run.
    """
    name = f"probe_{uuid.uuid4().hex[:10]}"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    marker = root / f"{name}.imported"
    (root / name / "mod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nraise SystemExit(3)\n"
        "def f(event):\n    return event\n"
    )
    return name


def _metric(url: str, name: str, labels: str = "") -> float:
    """A sample of a service's /metrics (0 when it is not there or the service is down)."""
    try:
        text = http_text(url, timeout=2)
    except OSError:
        return 0.0
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def _wait_metric(url: str, name: str, labels: str, at_least: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (value := _metric(url, name, labels)) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{{{labels}}} is {value}, not {at_least}, at {url}")
        time.sleep(0.3)


def _post(pipe: Pipeline, key: str) -> int:
    """The status of one event posted with `key`."""
    body = orjson.dumps(
        {
            "batch": [
                {"type": "track", "event": "Ping", "userId": "u", "messageId": uuid.uuid4().hex}
            ]
        }
    )
    req = urllib.request.Request(
        f"{pipe.gateway_url}/v1/batch",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": basic_auth(key)},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def _wait_status(pipe: Pipeline, key: str, status: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (got := _post(pipe, key)) != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"{key}: {got}, not {status}, after {timeout}s")
        time.sleep(0.3)


def test_the_follower_refuses_bad_records_and_applies_later_ones(kafka: KafkaSettings) -> None:
    first = parse_config(_config("k1"))
    apply_topics(required_topics(first, kafka), kafka)
    applied: list[PipelineConfig] = []
    changed = threading.Event()

    def on_change(cfg: PipelineConfig) -> None:
        if "exit" in cfg.sources[0].write_keys:
            raise SystemExit(3)  # what a module raising SystemExit on import does here
        applied.append(cfg)
        changed.set()

    registry = CollectorRegistry()
    allowed = TransformSettings(modules=("transforms",))
    follower = ConfigFollower(kafka, first, on_change, allowed, registry)
    follower.start()
    try:
        assert follower.wait_current(30)
        records = [
            b"{not json",
            b'{"sources": "nope"}',
            _record("k2", "os:system"),
            _record("exit"),
        ]
        for i, record in enumerate(records):
            _publish(kafka, record)
            assert follower.wait_current(30)
            assert applied == [], f"record {i} was applied"
            assert follower.current == first
            assert follower.alive()
        refused = {
            r: registry.get_sample_value("sluice_config_refused_total", {"reason": r})
            for r in ("json", "invalid", "apply")
        }
        assert refused == {"json": 1, "invalid": 2, "apply": 1}
        # A later valid config still applies: a new key, the old one revoked.
        later = _record("k3", "transforms.crm:enrich")
        _publish(kafka, later)
        expected = PipelineConfig.model_validate(orjson.loads(later))
        assert changed.wait(30)
        assert applied == [expected]
        assert follower.current == expected
        assert follower.alive()
    finally:
        follower.stop()


def test_a_gateway_keeps_its_keys_through_bad_records_and_takes_the_next_config(
    pipeline: Pipeline,
) -> None:
    kafka = KafkaSettings(bootstrap_servers=pipeline.bootstrap, topic_prefix=pipeline.prefix)
    metrics = f"{pipeline.gateway_url}/metrics"
    refused = "sluice_config_refused_total"
    pipeline.start("gateway")
    _wait_status(pipeline, pipeline.write_key, 200)

    # A new key, the old one revoked, and a transform from a module nobody allowed.
    _publish(kafka, _record("new-key", "os:system"))
    _wait_metric(metrics, refused, 'reason="invalid"', 1)
    assert _post(pipeline, "new-key") == 401
    assert _post(pipeline, pipeline.write_key) == 200

    _publish(kafka, b"\xff not json")
    _wait_metric(metrics, refused, 'reason="json"', 1)
    assert _post(pipeline, pipeline.write_key) == 200

    # The next valid config applies: the new key works, the revoked one no longer does.
    _publish(kafka, _record("new-key", "tests.transforms:fan_out"))
    _wait_status(pipeline, "new-key", 200)
    assert _post(pipeline, pipeline.write_key) == 401
    assert _metric(metrics, refused, 'reason="invalid"') == 1
    assert _metric(metrics, refused, 'reason="json"') == 1
    assert pipeline.services["gateway"].pid() is not None


def test_a_worker_survives_a_transform_that_exits_on_import_and_takes_the_next_config(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    kafka = KafkaSettings(bootstrap_servers=pipeline.bootstrap, topic_prefix=pipeline.prefix)
    mods = tmp_path / "mods"
    probe = _exit_on_import(mods)
    pipeline.env["PYTHONPATH"] = str(mods)
    pipeline.env["SLUICE_TRANSFORM_MODULES"] = f"tests.transforms,{probe}"
    worker = f"http://127.0.0.1:{pipeline.worker_metrics_port}/metrics"
    refused = "sluice_config_refused_total"
    routed = "sluice_processor_events_total"
    key = pipeline.write_key
    # Every config below names the `audit` destination: its topics exist from the start.
    audit = _config(key, "tests.transforms:fan_out")
    apply_topics(required_topics(parse_config(audit), kafka), kafka)
    pipeline.start("gateway", "worker")
    _wait_status(pipeline, key, 200)
    _wait_metric(worker, routed, 'destination="warehouse",outcome="routed"', 1, timeout=90)

    # Outside the allowed prefixes: refused by name, nothing imported.
    _publish(kafka, _record(key, "os:system"))
    _wait_metric(worker, refused, 'reason="invalid"', 1)
    # Allowed by name, but its module raises SystemExit when the worker imports it.
    _publish(kafka, _record(key, f"{probe}.mod:f"))
    _wait_metric(worker, refused, 'reason="apply"', 1)
    assert (mods / f"{probe}.imported").exists()
    _publish(kafka, b"[")
    _wait_metric(worker, refused, 'reason="json"', 1)
    # The worker kept its config: events still reach the warehouse, none the audit table.
    before = _metric(worker, routed, 'destination="warehouse",outcome="routed"')
    assert _post(pipeline, key) == 200
    _wait_metric(worker, routed, 'destination="warehouse",outcome="routed"', before + 1)
    assert _metric(worker, routed, 'destination="audit",outcome="routed"') == 0

    # Its follower is alive: the next valid config applies (a transform fanning out to audit).
    _publish(kafka, _record(key, "tests.transforms:fan_out"))
    deadline = time.monotonic() + 60
    while _metric(worker, routed, 'destination="audit",outcome="routed"') < 2:
        assert time.monotonic() < deadline, "the valid config after the bad ones never applied"
        assert _post(pipeline, key) == 200
        time.sleep(0.5)
    assert _metric(worker, routed, 'destination="audit",outcome="transformed"') >= 1
    assert pipeline.services["worker"].pid() is not None
    for reason, count in (("invalid", 1), ("apply", 1), ("json", 1)):
        assert _metric(worker, refused, f'reason="{reason}"') == count
