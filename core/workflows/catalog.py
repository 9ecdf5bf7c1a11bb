"""The playbook catalog: applied playbooks on the compacted topic `sluice.workflows.catalog`.

Each version of a playbook is one record keyed `<path>@<version>`, so compaction keeps
every version: a run keeps the version it started with, whatever is applied later. The
value (JSON) holds the path, the version (1, 2, ... per path), the playbook as parsed
from its YAML, the YAML text, its SHA-256, when it was applied, and an optional schedule
(`cron` and the `workload` of the runs it starts).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

import orjson
import yaml

from core.follower import Entry
from core.workflows.playbook import Playbook, PlaybookError, check


@dataclass(frozen=True)
class CatalogEntry:
    """One applied version of a playbook."""

    path: str
    version: int
    playbook: dict[str, Any]
    text: str
    digest: str
    applied_at_ms: int
    cron: str | None = None
    workload: dict[str, Any] | None = None

    @property
    def key(self) -> bytes:
        return f"{self.path}@{self.version}".encode()

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "path": self.path,
                "version": self.version,
                "playbook": self.playbook,
                "text": self.text,
                "sha256": self.digest,
                "applied_at_ms": self.applied_at_ms,
                "schedule": None
                if self.cron is None
                else {"cron": self.cron, "workload": self.workload or {}},
            }
        )

    @classmethod
    def from_bytes(cls, value: bytes) -> CatalogEntry:
        doc = orjson.loads(value)
        schedule = doc.get("schedule") or {}
        return cls(
            path=str(doc["path"]),
            version=int(doc["version"]),
            playbook=dict(doc["playbook"]),
            text=str(doc.get("text", "")),
            digest=str(doc.get("sha256", "")),
            applied_at_ms=int(doc.get("applied_at_ms", 0)),
            cron=schedule.get("cron"),
            workload=schedule.get("workload"),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "version": self.version,
            "name": self.playbook.get("metadata", {}).get("name"),
            "sha256": self.digest,
            "applied_at_ms": self.applied_at_ms,
            "schedule": None
            if self.cron is None
            else {"cron": self.cron, "workload": self.workload or {}},
            "steps": [s.get("step") for s in self.playbook.get("workflow", [])],
        }


def parse(text: str) -> tuple[dict[str, Any], Playbook]:
    """A playbook's YAML text, parsed and checked (PlaybookError with every reason)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlaybookError([f"not YAML: {exc}"]) from None
    return document, check(document)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Catalog:
    """Every applied version of every playbook, from the catalog topic (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, dict[int, CatalogEntry]] = {}

    def apply(self, entry: Entry) -> None:
        """One record of the catalog topic (a follower's `apply`)."""
        if entry.value is None or entry.key is None:
            return
        found = CatalogEntry.from_bytes(entry.value)
        with self._lock:
            self._entries.setdefault(found.path, {})[found.version] = found

    def put(self, found: CatalogEntry) -> None:
        with self._lock:
            self._entries.setdefault(found.path, {})[found.version] = found

    def get(self, path: str, version: int | None = None) -> CatalogEntry | None:
        """A version of the playbook at `path` (None: the latest)."""
        with self._lock:
            versions = self._entries.get(path)
            if not versions:
                return None
            return versions.get(max(versions) if version is None else version)

    def latest(self) -> list[CatalogEntry]:
        """The latest version of every playbook, by path."""
        with self._lock:
            return [v[max(v)] for _, v in sorted(self._entries.items()) if v]

    def versions(self, path: str) -> list[int]:
        with self._lock:
            return sorted(self._entries.get(path, {}))

    def lookup(self, path: str, version: int | None) -> tuple[int, dict[str, Any]] | None:
        """(version, playbook) for the engine's `Env.playbook`."""
        found = self.get(path, version)
        return None if found is None else (found.version, found.playbook)
