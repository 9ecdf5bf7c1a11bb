"""Write-key authentication: HTTP Basic username, or `writeKey` in the body as SDKs send it.

The job queues' submit keys (Bearer tokens) are `core.keys.SubmitKeys`: the job workers'
lease API checks them too."""

from __future__ import annotations

import base64
import binascii

from core.config import PipelineConfig, Source
from core.keys import SubmitKeys, bearer_token, digest, keyed
from gateway.limits import TokenBucket


class SourceTable:
    """Sources by write key, and their rate limiters; `update` swaps in a new config."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self._by_digest: dict[bytes, tuple[str, Source]] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._headers: dict[str, Source] = {}
        self.update(cfg)

    def update(self, cfg: PipelineConfig) -> None:
        """Use `cfg` from now on; buckets of sources whose limit did not change keep their state."""
        # Keyed by digest: the dict probe compares hashes, and the final check is
        # constant-time, so response timing says nothing about the key's characters.
        self._by_digest = {digest(k): (k, s) for k, s in cfg.write_keys().items()}
        self._headers = {}
        buckets: dict[str, TokenBucket] = {}
        for source in cfg.sources:
            if source.rate_limit is None:
                continue
            old = self._buckets.get(source.id)
            same = old is not None and (old.rate, old.capacity) == (
                source.rate_limit.events_per_s,
                source.rate_limit.capacity,
            )
            buckets[source.id] = old if same and old else TokenBucket(source.rate_limit)
        self._buckets = buckets

    def bucket(self, source_id: str) -> TokenBucket | None:
        """The rate limiter of a source, if it has a limit."""
        return self._buckets.get(source_id)

    def source_for(self, key: str | None) -> Source | None:
        """The enabled source that owns `key`, or None."""
        return keyed(self._by_digest, key)

    def source_for_header(self, header: str) -> Source | None:
        """The source of a `Basic` Authorization header naming a valid key, or None.

        SDKs send the same header on every request: headers that authenticated are
        remembered (until the config changes), so most requests skip base64 and hashing.
        """
        known = self._headers.get(header)
        if known is not None:
            return known
        source = self.source_for(basic_username(header))
        if source is not None:
            if len(self._headers) >= _REMEMBERED_HEADERS:
                self._headers.clear()
            self._headers[header] = source
        return source


_REMEMBERED_HEADERS = 1024


def basic_username(header: str | None) -> str | None:
    """The username of an HTTP Basic `Authorization` header (the write key), if any."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None


__all__ = ["SourceTable", "SubmitKeys", "basic_username", "bearer_token"]
