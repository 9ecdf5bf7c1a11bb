"""Webhook destinations: POST events to a URL and classify the answer.

Responses are classified like the error model says: 2xx delivered; 408, 429, 5xx,
timeouts and connection errors retriable (a Retry-After is honoured); any other 4xx
fatal. When a request may go (the circuit breaker and the rate limit) is the
delivery's concern (`connectors/delivery/pacing.py`).

What a config can make this process send, and where, is bounded: `${NAME}` expands
only allowed variables (`DeliverySettings.secret_refusal`), a redirect is a fatal
error unless `follow_redirects` is on (and then it stays within the URL's origin), and
with `block_private_targets` no request connects to a loopback, private, link-local,
multicast, unspecified or reserved address, whatever the URL's name resolves to.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from connectors.errors import (
    DeliveryRejected,
    DestinationUnavailable,
    RedirectRefused,
    SecretUnavailable,
    TargetRefused,
)
from connectors.retry import parse_retry_after
from core.config import SECRET_REF, WebhookConfig
from core.settings import DeliverySettings

# Answers that redirect; other 3xx (300, 304) are fatal like any unexpected answer.
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def expand(value: str, cfg: WebhookConfig, settings: DeliverySettings) -> str:
    """`value` with its `${NAME}` references replaced; SecretUnavailable when one cannot be."""
    return _expand(value, cfg, settings, lambda v: v)


def _expand(
    value: str, cfg: WebhookConfig, settings: DeliverySettings, escape: Callable[[str], str]
) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        # Checked again here: this process's settings decide, whoever validated the config.
        if reason := settings.secret_refusal(name, cfg.secrets):
            raise SecretUnavailable(f"${{{name}}} is not expanded: {reason}")
        if (found := os.environ.get(name)) is None:
            raise SecretUnavailable(f"${{{name}}} is not set in the delivery process")
        return escape(found)

    return SECRET_REF.sub(one, value)


def request_url(cfg: WebhookConfig, settings: DeliverySettings) -> URL:
    """The URL with its `${NAME}` references replaced (percent-encoded)."""
    return URL(_expand(str(cfg.url), cfg, settings, lambda v: quote(v, safe="")), encoded=True)


def request_headers(cfg: WebhookConfig, settings: DeliverySettings) -> dict[str, str]:
    """Configured headers, with auth, `${NAME}` references expanded."""

    def exp(value: str) -> str:
        return expand(value, cfg, settings)

    headers = {"Content-Type": "application/json"} | {k: exp(v) for k, v in cfg.headers.items()}
    if cfg.auth is not None:
        if cfg.auth.type == "bearer":
            headers["Authorization"] = f"Bearer {exp(cfg.auth.token)}"
        else:
            creds = aiohttp.BasicAuth(exp(cfg.auth.username), exp(cfg.auth.password))
            headers["Authorization"] = creds.encode()
    return headers


def refused_address(address: str) -> str | None:
    """Why a webhook may not connect to the IP `address` (None: a public address)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address} is not an IP address"
    # An IPv6 address can carry an IPv4 one that the network routes to: that one first.
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
        if ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for each in [*candidates, ip]:
        for kind, hit in (
            ("unspecified", each.is_unspecified),
            ("loopback", each.is_loopback),
            ("link-local", each.is_link_local),
            ("multicast", each.is_multicast),
            ("reserved", each.is_reserved),
            ("private", each.is_private),
            ("not public", not each.is_global),
        ):
            if hit:
                return f"{address} is {kind}"
    return None


class _Refused(OSError):
    """Raised inside aiohttp's connector: a name that resolved to refused addresses only."""


class PublicResolver(AbstractResolver):
    """Resolves like aiohttp does, then drops the addresses `refused_address` refuses.

    The check is on the addresses the connection is made to, at connect time, so a
    public name that resolves to 127.0.0.1 (DNS rebinding) is refused like the address.
    """

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The public addresses of `host`; `_Refused` when it has none."""
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if refused_address(r["host"]) is None]
        if not public:
            reasons = sorted({refused_address(r["host"]) or "" for r in results})
            raise _Refused(f"{host} resolves to no public address ({'; '.join(reasons)})")
        return public

    async def close(self) -> None:
        """Close the wrapped resolver."""
        await self._inner.close()


def webhook_session(settings: DeliverySettings) -> aiohttp.ClientSession:
    """The HTTP session webhook requests go through (public addresses only when blocking)."""
    resolver = PublicResolver() if settings.block_private_targets else None
    # No proxy from the environment: a request goes to the address that was checked.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver), trust_env=False)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def payload(event: dict[str, Any]) -> dict[str, Any]:
    """The event as Segment/RudderStack-shaped JSON (from an envelope decoded with int timestamps)."""
    body: dict[str, Any] = {
        "messageId": event["event_id"],
        "type": event["type"],
        "userId": event["user_id"],
        "anonymousId": event["anonymous_id"],
        "timestamp": _iso(event["timestamp"]),
        "receivedAt": _iso(event["received_at"]),
        "sentAt": _iso(event["sent_at"]),
        "originalTimestamp": _iso(event["original_timestamp"]),
        "context": orjson.loads(event["context"]),
        "sourceId": event["source_id"],
    }
    if event["type"] == "track":
        body["event"] = event["event"]
    elif event["type"] in ("page", "screen"):
        body["name"] = event["event"]
    if event["type"] in ("identify", "group"):
        body["traits"] = orjson.loads(event["traits"])
    else:
        body["properties"] = orjson.loads(event["properties"])
    if event["group_id"]:
        body["groupId"] = event["group_id"]
    if event["previous_id"]:
        body["previousId"] = event["previous_id"]
    return {k: v for k, v in body.items() if v is not None}


class WebhookClient:
    """Sends batches of events to one webhook and classifies the answer."""

    def __init__(
        self, cfg: WebhookConfig, session: aiohttp.ClientSession, settings: DeliverySettings
    ) -> None:
        """`session` from `webhook_session(settings)`: it checks resolved addresses."""
        self.cfg = cfg
        self.session = session
        self.settings = settings
        self.headers: dict[str, str] = {}
        self.url = URL(str(cfg.url), encoded=True)
        # A secret that cannot be expanded fails each request (fatal, with the reason)
        # rather than the whole delivery process.
        self.unusable: SecretUnavailable | None = None
        try:
            self.headers = request_headers(cfg, settings)
            self.url = request_url(cfg, settings)
        except SecretUnavailable as exc:
            self.unusable = exc

    async def send(self, events: Sequence[dict[str, Any]], attempt: int = 1) -> None:
        """POST the events (one object, or an array when batching); raise by class on failure.

        `X-Sluice-Attempt` tells the receiver which try this is (1 for the first).
        """
        if self.unusable is not None:
            raise SecretUnavailable(str(self.unusable))
        bodies = [payload(e) for e in events]
        data = orjson.dumps(bodies if self.cfg.batch_size > 1 else bodies[0])
        headers = self.headers | {"X-Sluice-Attempt": str(attempt)}
        deadline = time.monotonic() + self.cfg.timeout_s
        url = self.url
        for hops in range(MAX_REDIRECTS + 1):
            self._check_literal(url)
            timeout = aiohttp.ClientTimeout(total=max(0.001, deadline - time.monotonic()))
            try:
                async with self.session.post(
                    url, data=data, headers=headers, timeout=timeout, allow_redirects=False
                ) as resp:
                    status = resp.status
                    text = (await resp.text())[:200]
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
                    location = resp.headers.get("Location")
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, _Refused):
                    raise TargetRefused(
                        f"{exc.os_error} (SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS)"
                    ) from exc
                raise DestinationUnavailable(f"{type(exc).__name__}: {exc}") from exc
            except aiohttp.InvalidURL as exc:
                raise DeliveryRejected(f"invalid URL: {exc}") from exc
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise DestinationUnavailable(f"{type(exc).__name__}: {exc}") from exc
            if status not in REDIRECTS:
                break
            url = self._redirect(url, status, location, hops)
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise DestinationUnavailable(f"HTTP {status}: {text}", retry_after)
        raise DeliveryRejected(f"HTTP {status}: {text}")

    def _check_literal(self, url: URL) -> None:
        # aiohttp connects to an IP in the URL without asking the resolver: checked here.
        host = url.raw_host or ""
        if not (self.settings.block_private_targets and _is_ip(host)):
            return
        if reason := refused_address(host):
            raise TargetRefused(f"{reason} (SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS)")

    def _redirect(self, url: URL, status: int, location: str | None, hops: int) -> URL:
        """Where a redirect answer leads, if it may be followed; else RedirectRefused."""
        shown = (location or "")[:200]
        if not self.cfg.follow_redirects:
            raise RedirectRefused(
                f"HTTP {status} redirect to {shown!r}: redirects are not followed"
                " (settings.follow_redirects is off)"
            )
        if hops >= MAX_REDIRECTS:
            raise RedirectRefused(f"more than {MAX_REDIRECTS} redirects (last to {shown!r})")
        if not location:
            raise RedirectRefused(f"HTTP {status} redirect without a Location")
        try:
            target = url.join(URL(location))
        except ValueError as exc:
            raise RedirectRefused(f"HTTP {status} redirect to an invalid URL {shown!r}") from exc
        if _origin(target) != _origin(self.url):
            # The destination's headers and credentials are meant for its own origin only,
            # and its events too: a move to another host is for the config to say.
            raise RedirectRefused(
                f"HTTP {status} redirect to another origin {shown!r}: not followed, the"
                f" destination's requests go only to {self.url.origin()}"
            )
        return target


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme, url.host or "", url.port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _retry_after(value: str | None) -> float | None:
    # Seconds or an HTTP-date; how long is too long is the retry policy's cap.
    return parse_retry_after(value)
