"""Keys sent as Bearer tokens: the job queues' submit keys, compared in constant time.

The gateway checks them on the jobs API, the job workers on their lease API.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import TypeVar

from core.config import PipelineConfig, Queue

T = TypeVar("T")


def digest(key: str) -> bytes:
    """The SHA-256 of a key: tables of keys are looked up by it (see `keyed`)."""
    return hashlib.sha256(key.encode()).digest()


def keyed(table: Mapping[bytes, tuple[str, T]], key: str | None) -> T | None:
    """What `table` (by `digest` of the key: key, value) holds for `key`, or None.

    The dict probe compares hashes and the final check is constant-time, so the time an
    answer takes says nothing about the key's characters.
    """
    if not key:
        return None
    found = table.get(digest(key))
    if found is None or not hmac.compare_digest(found[0].encode(), key.encode()):
        return None
    return found[1]


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
        self._by_digest = {digest(k): (k, frozenset(v)) for k, v in names.items()}
        self._queues = {q.name: q for q in cfg.queues if q.enabled}

    def queues_for(self, key: str | None) -> frozenset[str] | None:
        """The queues `key` may submit to; None for no valid key (compared in constant time)."""
        return keyed(self._by_digest, key)

    def queue(self, name: str) -> Queue | None:
        """The enabled queue called `name`."""
        return self._queues.get(name)


class RunKeys:
    """The keys that may use the workflow runs API; `update` swaps in a new config."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self._by_digest: dict[bytes, tuple[str, bool]] = {}
        self.max_workload_bytes = cfg.workflows.max_workload_bytes
        self.update(cfg)

    def update(self, cfg: PipelineConfig) -> None:
        """Use `cfg`'s run keys from now on."""
        self._by_digest = {digest(k): (k, True) for k in cfg.workflows.run_keys}
        self.max_workload_bytes = cfg.workflows.max_workload_bytes

    def allows(self, key: str | None) -> bool:
        """Whether `key` is a run key (compared in constant time)."""
        return keyed(self._by_digest, key) is not None


def bearer_token(header: str | None) -> str | None:
    """The token of a `Bearer` Authorization header, if any."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
