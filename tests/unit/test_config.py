"""Pipeline config validation and the topics it needs."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from core.config import load_config, parse_config, tier_seconds
from core.errors import ConfigError
from core.settings import KafkaSettings, TransformSettings
from core.topics import Topics, required_topics
from core.transforms import resolve_function
from tests.configs import Configs


def test_the_shipped_config_is_valid_and_routes_the_demo_source() -> None:
    cfg = load_config(Path(__file__).parents[2] / "sluice.yaml")
    assert cfg.routes() == {
        "demo-web": ("warehouse", "crm", "legacy-crm"),
        "demo-crm": ("warehouse",),
    }
    assert cfg.write_keys()["demo-write-key"].id == "demo-web"


def test_required_topics_cover_destination_tiers_and_dlq() -> None:
    cfg = parse_config(
        "sources: [{id: s, write_keys: [k]}]\n"
        "destinations: [{id: wh, type: clickhouse, sources: [s], retry: {tiers: [5s, 1m]}}]"
    )
    specs = {s.name: s for s in required_topics(cfg, KafkaSettings(topic_prefix="x"))}
    assert set(specs) == {
        "x.events.ingest",
        "x.events.rejected",
        "x.jobs.status",
        "x.config",
        "x.schemas",
        "x.dlq.audit",
        "x.dest.wh",
        "x.dest.wh.retry.5s",
        "x.dest.wh.retry.1m",
        "x.dest.wh.dlq",
        "x.workflows.catalog",
        "x.workflows.events",
        "x.workflows.runs",
    }
    assert specs["x.config"].config["cleanup.policy"] == "compact"
    # The catalog and the runs table keep the latest per key; the event log is the history.
    assert specs["x.workflows.catalog"].config["cleanup.policy"] == "compact"
    assert specs["x.workflows.runs"].config["cleanup.policy"] == "compact"
    assert specs["x.workflows.events"].config["cleanup.policy"] == "delete"
    ordered = parse_config(
        "sources: [{id: s, write_keys: [k]}]\n"
        "destinations: [{id: d, type: clickhouse, retry: {preserve_order: true}}]"
    )
    parked = {s.name: s for s in required_topics(ordered, KafkaSettings(topic_prefix="x"))}
    assert parked["x.dest.d.parked"].config["cleanup.policy"] == "compact"
    assert specs["x.events.ingest"].config["cleanup.policy"] == "delete"
    dest = Topics("x").destination("wh", ("5s", "1m"))
    assert (dest.main, dest.retry(1), dest.dlq) == (
        "x.dest.wh",
        "x.dest.wh.retry.1m",
        "x.dest.wh.dlq",
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("sources: [{id: s, write_keys: [k]}, {id: s, write_keys: [j]}]", "duplicate source 's'"),
        ("sources: [{id: a, write_keys: [k]}, {id: b, write_keys: [k]}]", "duplicate write key"),
        ("destinations: [{id: d, type: clickhouse, sources: [nope]}]", "unknown sources"),
        ("destinations: [{id: d, type: kafka}]", "destinations.0.type"),
        ("sources: [{id: Bad Id, write_keys: [k]}]", "sources.0.id"),
        ("sources: [{id: s, write_keys: []}]", "write_keys"),
        ("destinations: [{id: d, type: webhook, retry: {tiers: [soon]}}]", "retry tier 'soon'"),
        ("[1, 2]", "top level must be a mapping"),
        ("sources: [", "not valid YAML"),
        ("colour: blue", "colour"),
    ],
)
def test_invalid_config_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config(text)


def test_tier_seconds() -> None:
    assert [tier_seconds(t) for t in ("500ms", "5s", "1m", "2h")] == [0.5, 5, 60, 7200]


def _probe_package(root: Path, body: str) -> str:
    """A fresh package under `root` whose module `mod` runs `body` when imported; its name.

    `body` may use MARKER, a file the import creates first, to show that it ran.
    """
    name = f"probe_{uuid.uuid4().hex[:12]}"
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    marker = root / f"{name}.imported"
    (package / "mod.py").write_text(
        f"import pathlib\nMARKER = pathlib.Path({str(marker)!r})\nMARKER.touch()\n{body}\n"
    )
    return name


def _transform_config(function: str) -> str:
    return (
        "sources: [{id: s, write_keys: [k]}]\n"
        f"destinations: [{{id: d, type: clickhouse, sources: [s], transform: {{function: '{function}'}}}}]"
    )


def test_validating_a_transform_imports_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _probe_package(tmp_path, "raise SystemExit(3)\ndef f(event): return event")
    allowed = TransformSettings(modules=(name,))
    cfg = parse_config(_transform_config(f"{name}.mod:f"), transforms=allowed)
    assert cfg.destinations[0].transform is not None
    # Outside the allowed prefixes: refused by name, still without importing.
    with pytest.raises(ConfigError, match="is not under an allowed prefix"):
        parse_config(_transform_config(f"{name}.mod:f"), transforms=TransformSettings())
    assert not (tmp_path / f"{name}.imported").exists()
    assert f"{name}.mod" not in sys.modules


@pytest.mark.parametrize(
    ("function", "allowed"),
    [
        ("os:system", ("transforms",)),
        ("transformsx.crm:f", ("transforms",)),
        ("tests.transforms_evil:f", ("tests.transforms",)),
        ("tests:f", ("tests.transforms",)),
        ("subprocess.run", ("transforms.",)),
        ("transforms.crm:f", ()),
    ],
)
def test_a_transform_outside_the_allowed_prefixes_is_refused(
    function: str, allowed: tuple[str, ...]
) -> None:
    transforms = TransformSettings(modules=allowed)
    with pytest.raises(ConfigError, match="is not under an allowed prefix"):
        parse_config(_transform_config(function), transforms=transforms)
    with pytest.raises(ConfigError, match="is not under an allowed prefix"):
        resolve_function(function, transforms)


@pytest.mark.parametrize(
    "function",
    ["transforms:f", "transforms.crm:f", "transforms.crm.deep.f", "tests.transforms:fan_out"],
)
def test_a_transform_under_an_allowed_prefix_validates(function: str) -> None:
    transforms = TransformSettings(modules=("transforms.", "tests.transforms"))
    assert parse_config(_transform_config(function), transforms=transforms).destinations


@pytest.mark.parametrize(
    "function", ["transforms..crm:f", ".transforms:f", "transforms:a.b", "trans forms:f", "f"]
)
def test_a_transform_path_that_is_not_a_dotted_name_is_refused(function: str) -> None:
    with pytest.raises(ConfigError, match=r"transform\.function"):
        parse_config(_transform_config(function), transforms=TransformSettings())


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("raise SystemExit(3)", "SystemExit"),
        ("import os\nos._exit", "has no function"),  # imports, but no `f`
        ("raise RuntimeError('boom')", "RuntimeError: boom"),
        ("class Weird(BaseException): pass\nraise Weird()", "Weird"),
    ],
)
def test_importing_a_transform_contains_whatever_its_module_does(
    body: str, error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _probe_package(tmp_path, body)
    with pytest.raises(ConfigError, match=error):
        resolve_function(f"{name}.mod:f", TransformSettings(modules=(name,)))
    assert (tmp_path / f"{name}.imported").exists()  # it did run, and nothing escaped


def test_keyboard_interrupt_while_importing_a_transform_is_not_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _probe_package(tmp_path, "raise KeyboardInterrupt")
    with pytest.raises(KeyboardInterrupt):
        resolve_function(f"{name}.mod:f", TransformSettings(modules=(name,)))


def test_allowed_transform_modules_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert TransformSettings().modules == ("transforms",)
    monkeypatch.setenv("SLUICE_TRANSFORM_MODULES", " tests.transforms, acme.rules ,")
    settings = TransformSettings()
    assert settings.modules == ("tests.transforms", "acme.rules")
    assert settings.allows("acme.rules.crm")
    assert not settings.allows("acme.rulesx")
    assert not settings.allows("acme")


def test_a_queue_has_a_topic_per_priority_and_a_dlq(configs: Configs) -> None:
    cfg = parse_config(configs.text(queues=[configs.queue("mail", priorities=3, partitions=8)]))
    specs = {s.name: s for s in required_topics(cfg, KafkaSettings(topic_prefix="x"))}
    mail = sorted(name for name in specs if name.startswith("x.jobs.mail."))
    assert mail == ["x.jobs.mail.dlq", "x.jobs.mail.p0", "x.jobs.mail.p1", "x.jobs.mail.p2"]
    assert {specs[name].partitions for name in mail} == {8}
    assert cfg.queue("mail") is not None
    assert cfg.queue("post") is None


def test_a_submit_key_may_not_be_a_write_key_and_queue_names_are_unique(
    configs: Configs,
) -> None:
    with pytest.raises(ConfigError, match="also a write key"):
        parse_config(
            configs.text(queues=[configs.queue(keys=["k"])], sources=[configs.source(keys=["k"])])
        )
    with pytest.raises(ConfigError, match="duplicate queue"):
        parse_config(configs.text(queues=[configs.queue("a"), configs.queue("a")]))
    with pytest.raises(ConfigError, match="priorities"):
        parse_config(configs.text(queues=[configs.queue(priorities=11)]))


def test_job_backoff_grows_to_its_cap_within_its_jitter() -> None:
    from core.config import JobBackoff  # noqa: PLC0415

    backoff = JobBackoff()  # 100 ms, x2, 60 s, +/- 10 %
    assert [backoff.delay_ms(n) for n in (1, 2, 3, 11, 30)] == [100, 200, 400, 60_000, 60_000]
    assert (backoff.delay_ms(3, -1), backoff.delay_ms(3, 1)) == (360, 440)


def test_a_queue_schedule_needs_a_valid_cron_a_unique_name_and_a_priority_in_range() -> None:
    configs = Configs()

    def cfg(*schedules: dict[str, object]) -> str:
        return configs.text(queues=[configs.queue("work", priorities=3, schedules=list(schedules))])

    parsed = parse_config(cfg({"name": "nightly", "cron": "0 3 * * *", "payload": {"a": 1}}))
    (schedule,) = parsed.queues[0].schedules
    assert (schedule.cron, schedule.payload, schedule.catch_up) == ("0 3 * * *", {"a": 1}, False)
    for bad, reason in (
        (({"name": "x", "cron": "every day"},), "not a cron expression"),
        (({"name": "x", "cron": "* * * * *"}, {"name": "x", "cron": "0 * * * *"}), "duplicate"),
        (({"name": "x", "cron": "* * * * *", "priority": 3},), "out of range"),
    ):
        with pytest.raises(ConfigError, match=reason):
            parse_config(cfg(*bad))


def test_the_workflow_queue_takes_no_submit_keys(configs: Configs) -> None:
    runner = {"type": "python", "function": "connectors.workflows.tools:run_step"}
    # A submit key there would let its holder run any python step's code.
    with pytest.raises(ConfigError, match="takes no submit_keys"):
        parse_config(configs.text(queues=[configs.queue("workflows", executor=runner)]))
    parsed = parse_config(configs.text(queues=[configs.queue("wf", keys=(), executor=runner)]))
    assert parsed.queues[0].submit_keys == ()
