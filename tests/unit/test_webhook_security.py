"""Webhook destinations cannot be turned against the machine they run on.

`${NAME}` expands only allowed variables (refused at config check otherwise), redirects
are not followed unless configured and never to another origin, and with
SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS no request reaches a loopback, private or
link-local address, whatever the URL's name resolves to. Each refusal at delivery time
is a DLQ record with the reason, through the real delivery process and broker.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml
from aiohttp import web
from typer.testing import CliRunner

from connectors.errors import SecretUnavailable
from connectors.webhook import WebhookClient, refused_address, webhook_session
from core.config import WebhookConfig, parse_config
from core.errors import ConfigError
from core.settings import DeliverySettings
from ops.cli import app
from tests.pipeline import (
    http_receiver,
)

EVENT = {
    "event_id": "e1",
    "type": "track",
    "event": "Paid",
    "user_id": "u1",
    "anonymous_id": None,
    "timestamp": 0,
    "received_at": 0,
    "sent_at": None,
    "original_timestamp": None,
    "context": "{}",
    "properties": "{}",
    "traits": "{}",
    "source_id": "s",
    "group_id": None,
    "previous_id": None,
}


def _webhook(settings: str) -> str:
    return f"destinations: [{{id: crm, type: webhook, settings: {settings}}}]"


@pytest.mark.parametrize(
    ("settings", "field", "variable"),
    [
        (
            "{url: 'http://crm.example/', headers: {X-Key: '${SLUICE_WAREHOUSE_PASSWORD}'}}",
            "settings.headers.X-Key",
            "SLUICE_WAREHOUSE_PASSWORD",
        ),
        (
            "{url: 'http://crm.example/', auth: {type: bearer, token: '${AWS_SECRET_ACCESS_KEY}'}}",
            "settings.auth.token",
            "AWS_SECRET_ACCESS_KEY",
        ),
        (
            "{url: 'http://crm.example/', auth: {type: basic, username: u, password: '${HOME}'}}",
            "settings.auth.password",
            "HOME",
        ),
        ("{url: 'http://crm.example/in?key=${PATH}'}", "settings.url", "PATH"),
        ("{url: 'http://crm.example/${HOSTNAME}/in'}", "settings.url", "HOSTNAME"),
        # Listing a name does not make every name allowed.
        (
            "{url: 'http://crm.example/', secrets: [AWS_SECRET_ACCESS_KEY],"
            " headers: {X-Key: '${AWS_SECRET_ACCESS_KEY}'}}",
            "settings.headers.X-Key",
            "AWS_SECRET_ACCESS_KEY",
        ),
        (
            "{url: 'http://crm.example/', secrets: [SLUICE_WAREHOUSE_PASSWORD],"
            " headers: {X-Key: '${SLUICE_WAREHOUSE_PASSWORD}'}}",
            "settings.headers.X-Key",
            "SLUICE_WAREHOUSE_PASSWORD",
        ),
    ],
)
def test_a_variable_off_the_allowlist_is_refused_at_config_check(
    settings: str, field: str, variable: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(_webhook(settings))
    reason = str(refused.value)
    assert "destination 'crm'" in reason
    assert field in reason
    assert f"${{{variable}}}" in reason


def test_sluice_config_check_refuses_a_header_naming_the_warehouse_password(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sluice.yaml"
    path.write_text(
        _webhook("{url: 'http://crm.example/', headers: {X-Key: '${SLUICE_WAREHOUSE_PASSWORD}'}}")
    )
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 1
    assert "${SLUICE_WAREHOUSE_PASSWORD}" in result.output
    assert "settings.headers.X-Key" in result.output


def test_allowed_variables_pass_the_check_and_the_prefix_is_a_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allowed = _webhook(
        "{url: 'http://crm.example/in?key=${SLUICE_SECRET_CRM_KEY}', secrets: [CRM_TOKEN],"
        " auth: {type: bearer, token: '${CRM_TOKEN}'}}"
    )
    parse_config(allowed)
    monkeypatch.setenv("SLUICE_DELIVERY_SECRET_PREFIX", "CRM_")
    parse_config(_webhook("{url: 'http://crm.example/', headers: {X-Key: '${CRM_KEY}'}}"))
    with pytest.raises(ConfigError, match="SLUICE_SECRET_CRM_KEY"):
        parse_config(allowed)


def test_a_variable_in_the_urls_host_is_refused() -> None:
    with pytest.raises(ConfigError, match="not in its host"):
        parse_config(_webhook("{url: 'http://${SLUICE_SECRET_HOST}/in'}"))


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not public"),
        ("::ffff:127.0.0.1", "loopback"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_which_addresses_are_refused(address: str, kind: str | None) -> None:
    reason = refused_address(address)
    if kind is None:
        assert reason is None
    else:
        assert reason == f"{address} is {kind}"


def test_docker_compose_blocks_private_targets_for_the_delivery_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.kafka.yml").read_text())
    env = compose["services"]["deliver"]["environment"]
    monkeypatch.setenv(
        "SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS", env["SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS"]
    )
    assert DeliverySettings().block_private_targets is True


async def test_an_allowlisted_variable_is_expanded_and_received(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICE_SECRET_CRM_KEY", "k&1/2")
    monkeypatch.setenv("CRM_TOKEN", "t0ken")
    monkeypatch.setenv("SLUICE_WAREHOUSE_PASSWORD", "never-sent")
    seen: list[tuple[dict[str, str], dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append((dict(request.headers), dict(request.query)))
        return web.Response(status=200)

    async with http_receiver(hook) as port:
        config = parse_config(
            _webhook(
                f"{{url: 'http://127.0.0.1:{port}/hook?key=${{SLUICE_SECRET_CRM_KEY}}',"
                " secrets: [CRM_TOKEN], headers: {X-Crm: 'id-${CRM_TOKEN}'},"
                " auth: {type: bearer, token: '${CRM_TOKEN}'}}"
            )
        )
        cfg = config.destinations[0].connector()
        assert isinstance(cfg, WebhookConfig)
        settings = DeliverySettings()
        async with webhook_session(settings) as session:
            await WebhookClient(cfg, session, settings).send([EVENT])

    [(headers, query)] = seen
    assert query == {"key": "k&1/2"}
    assert headers["Authorization"] == "Bearer t0ken"
    assert headers["X-Crm"] == "id-t0ken"
    assert not any("never-sent" in v for v in headers.values())


async def test_a_missing_allowed_variable_fails_the_request_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SLUICE_SECRET_CRM_TOKEN", raising=False)
    requests = 0

    async def hook(_request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        return web.Response(status=200)

    async with http_receiver(hook) as port:
        cfg = WebhookConfig.model_validate(
            {
                "url": f"http://127.0.0.1:{port}/hook",
                "auth": {"type": "bearer", "token": "${SLUICE_SECRET_CRM_TOKEN}"},
            }
        )
        settings = DeliverySettings()
        async with webhook_session(settings) as session:
            with pytest.raises(SecretUnavailable, match=r"SLUICE_SECRET_CRM_TOKEN\} is not set"):
                await WebhookClient(cfg, session, settings).send([EVENT])
    assert requests == 0  # never sent with an empty credential


async def test_a_redirect_within_the_origin_is_followed_when_configured() -> None:
    landed: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        if request.path == "/old":
            raise web.HTTPPermanentRedirect("/new")
        landed.append(request.headers.get("X-Key", ""))
        body = orjson.loads(await request.read())
        assert body["messageId"] == "e1"
        return web.Response(status=200)

    async with http_receiver(hook, ("/old", "/new")) as port:
        settings = DeliverySettings()
        cfg = WebhookConfig.model_validate(
            {
                "url": f"http://127.0.0.1:{port}/old",
                "headers": {"X-Key": "k"},
                "follow_redirects": True,
            }
        )
        async with webhook_session(settings) as session:
            await WebhookClient(cfg, session, settings).send([EVENT])
    assert landed == ["k"]
