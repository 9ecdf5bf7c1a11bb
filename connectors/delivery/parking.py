"""Order-preserving retries: keys parked behind a record that waits in a retry tier.

While a record of key K waits in a retry tier, later records of K for the same
destination wait behind it ("held") and are delivered after it, in order; other keys
flow freely. The state is a table per destination partition, kept in the compacted
topic `sluice.dest.<d>.parked` like a Faust table's changelog: partition p of the
table lives in partition p of that topic (every topic of a destination has the same
partitions, and every record keeps its partition number), is restored when the
partition is assigned and is written, confirmed by Kafka, before the offset of the
record that changed it is committed. So a restart or a rebalance keeps the order. A
restore (`read`) runs beside the consumer's poll loop, however long the changelog, and
`install` makes it current; `held_count` is what the held-records bound is checked on.

Records on the changelog:
- `k:<key>` → `{"head": "<p>:<offset>" | null, "attempts": n}`: the key is parked; `head`
  names the record waiting in a tier (null while the held records are being released).
- `h:<seq, 8 bytes><key>` → one held record (its value, headers and origin).
A tombstone removes either once it is done.
"""

from __future__ import annotations

import base64
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import structlog

from core.follower import CompactedFollower, Entry
from core.kafka import Record
from core.producer import EventProducer
from core.settings import KafkaSettings

log = structlog.get_logger("sluice.delivery")


@dataclass(frozen=True)
class Held:
    """A record waiting behind its key's parked head."""

    seq: int
    ref: str
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int


@dataclass
class KeyState:
    """A parked key: the record it waits for, and the records held behind it."""

    head: str | None
    attempts: int = 0
    held: deque[Held] = field(default_factory=deque)


def _state_key(key: bytes) -> bytes:
    return b"k:" + key


def _held_key(key: bytes, seq: int) -> bytes:
    return b"h:" + seq.to_bytes(8, "big") + key


def _encode_held(held: Held) -> bytes:
    return orjson.dumps(
        {
            "ref": held.ref,
            "value": base64.b64encode(held.value).decode(),
            "headers": [[k, base64.b64encode(v).decode()] for k, v in held.headers],
            "ts": held.timestamp_ms,
        }
    )


def _decode_held(seq: int, data: bytes) -> Held:
    body = orjson.loads(data)
    return Held(
        seq,
        body["ref"],
        base64.b64decode(body["value"]),
        [(k, base64.b64decode(v)) for k, v in body["headers"]],
        int(body["ts"]),
    )


def _apply(
    name: bytes,
    value: bytes | None,
    states: dict[bytes, KeyState],
    held: dict[bytes, dict[int, Held]],
) -> int:
    """Apply one changelog record to a partition's state being read; the next seq it implies."""
    if name.startswith(b"k:"):
        key = name[2:]
        if value is None:
            states.pop(key, None)
        else:
            body = orjson.loads(value)
            head = body["head"]
            if head is not None and not isinstance(head, str):
                raise TypeError(f"head {head!r} is not a record reference")
            states[key] = KeyState(head, int(body["attempts"]))
        return 0
    if name.startswith(b"h:") and len(name) >= 10:
        n, key = int.from_bytes(name[2:10], "big"), name[10:]
        if value is None:
            held.get(key, {}).pop(n, None)
        else:
            record = _decode_held(n, value)
            _ref_offset(record.ref)
            held.setdefault(key, {})[n] = record
        return n + 1
    raise ValueError(f"unknown changelog key {name[:40]!r}")


def _ref_offset(ref: str) -> int:
    """The offset in a record reference `<partition>:<offset>`."""
    partition, sep, offset = ref.partition(":")
    if not sep or not partition.isdigit():
        raise ValueError(f"record reference {ref!r} is not <partition>:<offset>")
    return int(offset)


# A partition's state as read from the changelog (keys, next sequence number); None when
# the read was given up.
Restored = tuple[dict[bytes, "KeyState"], int] | None


class ParkedKeys:
    """The parked keys of one destination, by partition, backed by its changelog topic."""

    def __init__(self, topic: str, kafka: KafkaSettings, producer: EventProducer) -> None:
        self.topic = topic
        self.kafka = kafka
        self.producer = producer
        self._parts: dict[int, dict[bytes, KeyState]] = {}
        self._next_seq: dict[int, int] = {}
        self._held: dict[int, int] = {}

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._parts.values())

    def partitions(self) -> set[int]:
        """The partitions whose state is loaded."""
        return set(self._parts)

    def read(
        self,
        partition: int,
        cancelled: threading.Event | None = None,
        progress: Callable[[], None] | None = None,
        idle_timeout: float = 30.0,
    ) -> Restored:
        """Read a partition's state from the changelog (blocking; run it beside the poll loop).

        However long the changelog, this only reads (up to the end the partition had when
        the read began, through a `core.follower.CompactedFollower`): `install` makes the
        state current. A record Sluice did not write is logged and skipped. It gives up (None) when `cancelled` is set (the partition was revoked meanwhile),
        calls `progress` after each batch, and raises TimeoutError only when the broker
        sent nothing for `idle_timeout` s before the end was reached.
        """
        states: dict[bytes, KeyState] = {}
        held: dict[bytes, dict[int, Held]] = {}
        seq = 0

        def apply(entry: Entry) -> None:
            nonlocal seq
            seq = max(seq, _apply(entry.key or b"", entry.value, states, held))

        def skipped(entry: Entry, exc: Exception) -> None:
            # Not written by Sluice (or damaged): it cannot be delivered, and it must not
            # keep the partition from being restored.
            log.error(
                "parked changelog record skipped",
                topic=self.topic,
                partition=partition,
                offset=entry.offset,
                error=f"{type(exc).__name__}: {exc}",
            )

        changelog = CompactedFollower(
            self.kafka,
            self.topic,
            apply,
            name="parked",
            partition=partition,
            on_bad=skipped,
            batch=1000,
        )
        if not changelog.read_to_end(cancelled, progress, idle_timeout):
            return None
        for key, records in held.items():
            if records:
                state = states.setdefault(key, KeyState(None))
                state.held.extend(records[n] for n in sorted(records))
        return states, seq

    def install(self, partition: int, restored: tuple[dict[bytes, KeyState], int]) -> list[bytes]:
        """Make a partition's state (from `read`) current; the keys to release now.

        The returned keys have no head in a tier (a release was under way when the
        previous owner stopped): their held records must be released by the caller.
        """
        states, seq = restored
        self.drop(partition)
        self._parts[partition] = states
        self._next_seq[partition] = seq
        self._held[partition] = sum(len(state.held) for state in states.values())
        return [key for key, state in states.items() if state.head is None]

    def restore(self, partition: int, timeout: float = 30.0) -> list[bytes]:
        """`read` and `install` in one blocking call; the keys to release now."""
        restored = self.read(partition, idle_timeout=timeout)
        assert restored is not None  # never cancelled
        return self.install(partition, restored)

    @property
    def held_count(self) -> int:
        """Records held in memory behind parked keys, over every partition."""
        return sum(self._held.values())

    def drop(self, partition: int) -> None:
        """Forget a partition's state (it was revoked; its next owner restores it)."""
        self._parts.pop(partition, None)
        self._next_seq.pop(partition, None)
        self._held.pop(partition, None)

    def get(self, partition: int, key: bytes) -> KeyState | None:
        """The state of a parked key, or None when the key is free."""
        return self._parts.get(partition, {}).get(key)

    async def park(self, partition: int, key: bytes, head: str, attempts: int) -> None:
        """Park `key` behind `head` (a record now in a tier), or note its new attempt."""
        keys = self._parts.setdefault(partition, {})
        state = keys.get(key)
        if state is None:
            state = keys[key] = KeyState(head, attempts)
        state.head, state.attempts = head, attempts
        await self._write(partition, [(_state_key(key), self._state_value(state), None)])

    def hold(self, partition: int, key: bytes, record: Held) -> Held:
        """Queue a record behind its parked key (in memory at once; `persist` writes it)."""
        seq = self._next_seq.get(partition, 0)
        self._next_seq[partition] = seq + 1
        held = Held(seq, record.ref, record.value, record.headers, record.timestamp_ms)
        self._parts[partition][key].held.append(held)
        self._held[partition] = self._held.get(partition, 0) + 1
        return held

    async def persist(self, partition: int, key: bytes, held: Held) -> None:
        """Write a held record to the changelog."""
        await self._write(partition, [(_held_key(key, held.seq), _encode_held(held), None)])

    async def head_resolved(self, partition: int, key: bytes) -> None:
        """The head was delivered or dead-lettered: its held records are released next."""
        state = self._parts[partition][key]
        state.head, state.attempts = None, 0
        await self._write(partition, [(_state_key(key), self._state_value(state), None)])

    def next_held(self, partition: int, key: bytes) -> Held | None:
        """The oldest record held behind `key`; None (and the key is freed) when none is left."""
        keys = self._parts.get(partition)
        state = keys.get(key) if keys is not None else None
        if state is None:
            return None
        if state.held:
            return state.held[0]
        # Checked and removed in one step: a record arriving now is delivered directly.
        del keys[key]  # type: ignore[union-attr] # keys is set when state is
        return None

    async def released(self, partition: int, key: bytes, held: Held) -> None:
        """A held record was delivered, dead-lettered or became the head: forget it."""
        state = self.get(partition, key)
        if state is not None and state.held and state.held[0].seq == held.seq:
            state.held.popleft()
            self._held[partition] = max(0, self._held.get(partition, 0) - 1)
        await self._write(partition, [(_held_key(key, held.seq), None, None)])

    async def freed(self, partition: int, key: bytes) -> None:
        """Write the tombstone of a key that `next_held` freed."""
        await self._write(partition, [(_state_key(key), None, None)])

    @staticmethod
    def _state_value(state: KeyState) -> bytes:
        return orjson.dumps({"head": state.head, "attempts": state.attempts})

    async def _write(self, partition: int, records: list[Record]) -> None:
        await self.producer.send_batch(self.topic, records, partition)
