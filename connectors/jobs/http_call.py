"""The http executor: a job runs as a POST of its document to a URL.

A queue's `executor: {type: http, url: ..., headers: {...}}`: each attempt POSTs the
job's document (what a command reads on stdin: id, queue, attempt, max_attempts,
priority, tags, deadline_ms, payload) as JSON, with `X-Sluice-Job-Id` and
`X-Sluice-Attempt`, and waits until the job's deadline at most.

- 2xx: COMPLETED, the response's JSON body (empty: null) the result; a body that is not
  JSON, or longer than MAX_RESPONSE_BYTES, fails the job (DEAD);
- 408, 429, 5xx, a connection that fails: the attempt failed, retried with the backoff;
- any other status (and a redirect, which is not followed): the job failed, DEAD.

With `SLUICE_JOBS_BLOCK_PRIVATE_TARGETS` the request connects to public addresses only,
checked at connect time like webhooks' (a name resolving to 127.0.0.1 is refused too).
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
from yarl import URL

from connectors.jobs.executor import Fatal, JobContext, Retry
from connectors.webhook import PublicResolver, refused_address
from core.config import HttpExecutor
from core.settings import JobSettings

MAX_RESPONSE_BYTES = 1024 * 1024


class HttpFailed(Fatal):
    """The endpoint said the job cannot succeed (a 4xx, a redirect, a body not JSON)."""


class HttpCall:
    """POSTs each attempt's job to the queue's URL over one session."""

    with_context = True

    def __init__(self, executor: HttpExecutor, settings: JobSettings) -> None:
        self.url = URL(str(executor.url), encoded=True)
        self.headers = {**executor.headers, "Content-Type": "application/json"}
        self.block_private = settings.block_private_targets
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            resolver = PublicResolver() if self.block_private else None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=resolver), trust_env=False
            )
        return self._session

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()

    async def __call__(self, payload: Any, context: JobContext | None) -> Any:
        """POST the job; its result, or the exception of its failure."""
        assert context is not None
        host = self.url.raw_host or ""
        if (
            self.block_private
            and (reason := refused_address(host)) is not None
            and ("not an IP address" not in reason)
        ):
            raise HttpFailed(f"{reason} (SLUICE_JOBS_BLOCK_PRIVATE_TARGETS)")
        left_s = context.deadline_ms / 1000 - time.time() if context.deadline_ms else 300.0
        headers = self.headers | {
            "X-Sluice-Job-Id": context.id,
            "X-Sluice-Attempt": str(context.attempt),
        }
        try:
            async with self._client().post(
                self.url,
                data=orjson.dumps(context.document(payload)),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=max(0.001, left_s)),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
        except aiohttp.ClientConnectorError as exc:
            if "resolves to no public address" in str(exc.os_error):
                raise HttpFailed(f"{exc.os_error} (SLUICE_JOBS_BLOCK_PRIVATE_TARGETS)") from exc
            raise Retry(f"{type(exc).__name__}: {exc}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Retry(f"{type(exc).__name__}: {exc}") from exc
        text = body[:200].decode("utf-8", "replace")
        if status in (408, 429) or status >= 500:
            raise Retry(f"HTTP {status}: {text}")
        if not 200 <= status < 300:
            raise HttpFailed(f"HTTP {status}: {text}")
        if len(body) > MAX_RESPONSE_BYTES:
            raise HttpFailed(f"the response is longer than {MAX_RESPONSE_BYTES} bytes")
        if not body.strip():
            return None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise HttpFailed(f"the response is not JSON ({exc}): {text}") from None
