"""What earlier redrives of a destination sent, read back from the audit topic."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import orjson

from core.settings import KafkaSettings
from core.topics import Topics
from ops.dlq.letters import read_topic


class RefSet:
    """DLQ records (`partition:offset`) as sorted offset ranges per partition."""

    def __init__(self) -> None:
        self._ranges: dict[int, list[tuple[int, int]]] = {}
        self._dirty: set[int] = set()

    def add(self, partition: int, first: int, last: int | None = None) -> None:
        """Add one offset or the range first..last."""
        self._ranges.setdefault(partition, []).append((first, first if last is None else last))
        self._dirty.add(partition)

    def add_text(self, text: str) -> None:
        """Add `p:o` or `p:a-b` as the audit records write them (junk is ignored)."""
        part, _, span = text.partition(":")
        first, _, last = span.partition("-")
        try:
            self.add(int(part), int(first), int(last) if last else None)
        except ValueError:
            return

    def _merged(self, partition: int) -> list[tuple[int, int]]:
        ranges = self._ranges.get(partition, [])
        if partition in self._dirty:
            merged: list[tuple[int, int]] = []
            for first, last in sorted(ranges):
                if merged and first <= merged[-1][1] + 1:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], last))
                else:
                    merged.append((first, last))
            ranges = self._ranges[partition] = merged
            self._dirty.discard(partition)
        return ranges

    def __contains__(self, ref: object) -> bool:
        if not isinstance(ref, str):
            return False
        part, _, offset = ref.partition(":")
        try:
            p, o = int(part), int(offset)
        except ValueError:
            return False
        ranges = self._merged(p)
        i = bisect.bisect_right(ranges, (o, 1 << 62)) - 1
        return i >= 0 and ranges[i][0] <= o <= ranges[i][1]

    def __len__(self) -> int:
        return sum(b - a + 1 for p in list(self._ranges) for a, b in self._merged(p))

    def texts(self) -> list[str]:
        """The ranges as `p:o` / `p:a-b`, partition by partition."""
        return [
            f"{p}:{a}" if a == b else f"{p}:{a}-{b}"
            for p in sorted(self._ranges)
            for a, b in self._merged(p)
        ]


@dataclass
class RedriveHistory:
    """What the audit topic says about the redrives of one destination."""

    done: RefSet = field(default_factory=RefSet)
    # `start` records of redrives whose `done` records are not all there.
    unfinished: list[dict[str, Any]] = field(default_factory=list)


def redrive_history(kafka: KafkaSettings, destination: str) -> RedriveHistory:
    """The DLQ records earlier redrives of `destination` sent, and those left unfinished."""
    history = RedriveHistory()
    starts: dict[str, dict[str, Any]] = {}
    parts: dict[tuple[str, str], set[int]] = {}
    complete: set[str] = set()
    for msg in read_topic(kafka, Topics(kafka.topic_prefix).dlq_audit):
        try:
            audit = orjson.loads(msg.value() or b"{}")
        except orjson.JSONDecodeError:
            continue
        if not isinstance(audit, dict) or audit.get("destination") != destination:
            continue
        if audit.get("dry_run"):
            continue
        kind, run = audit.get("kind"), str(audit.get("id"))
        if kind == "start":
            starts[run] = audit
            continue
        for text in audit.get("records", []):
            history.done.add_text(str(text))
        if kind == "done":
            write = (run, str(audit.get("write")))
            seen = parts.setdefault(write, set())
            seen.add(int(audit.get("part", 0)))
            if len(seen) >= int(audit.get("parts", 1)):
                complete.add(run)
    history.unfinished = [a for run, a in starts.items() if run not in complete]
    return history


def redriven_refs(kafka: KafkaSettings, destination: str) -> RefSet:
    """DLQ records (`partition:offset`) that earlier redrives of `destination` sent."""
    return redrive_history(kafka, destination).done
