"""Write-key authentication: HTTP Basic username, or `writeKey` in the body as SDKs send it;
and the job queues' submit keys, sent as Bearer tokens."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from core.config import PipelineConfig, Queue, Source
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
        self._by_digest = {_digest(k): (k, s) for k, s in cfg.write_keys().items()}
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
        if not key:
            return None
        found = self._by_digest.get(_digest(key))
        if found is None or not hmac.compare_digest(found[0].encode(), key.encode()):
            return None
        return found[1]

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


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


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


class SubmitKeys:
    """The queues each submit key may use; `update` swaps in a new config."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self._by_digest: dict[bytes, tuple[str, frozenset[str]]] = {}
        self._queues: dict[str, Queue] = {}
        self.update(cfg)

    def update(self, cfg: PipelineConfig) -> None:
        """Use `cfg`'s queues and submit keys from now on."""
        names: dict[str, set[str]] = {}
        for queue in cfg.queues:
            if queue.enabled:
                for key in queue.submit_keys:
                    names.setdefault(key, set()).add(queue.name)
        self._by_digest = {_digest(k): (k, frozenset(v)) for k, v in names.items()}
        self._queues = {q.name: q for q in cfg.queues if q.enabled}

    def queues_for(self, key: str | None) -> frozenset[str] | None:
        """The queues `key` may submit to; None for no valid key (compared in constant time)."""
        if not key:
            return None
        found = self._by_digest.get(_digest(key))
        if found is None or not hmac.compare_digest(found[0].encode(), key.encode()):
            return None
        return found[1]

    def queue(self, name: str) -> Queue | None:
        """The enabled queue called `name`."""
        return self._queues.get(name)


def bearer_token(header: str | None) -> str | None:
    """The token of a `Bearer` Authorization header, if any."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
