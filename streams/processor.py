"""The processor's pure logic: decode an ingested event and route it to its destinations.

No Faust here: the agent hands batches in and produces what comes out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ops.config import PipelineConfig
from ops.producer import Headers
from ops.topics import Topics
from schemas.codec import AvroCodec
from schemas.errors import SchemaError


class Incoming(NamedTuple):
    """One record taken from the ingest topic (a tuple: built for every event)."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass
class Routed:
    """What one batch turns into: records per output topic, and counts for metrics."""

    outputs: dict[str, list[tuple[bytes | None, bytes, Headers | None]]] = field(
        default_factory=dict
    )
    delivered: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    unrouted: int = 0


class Router:
    """Routes by source id from a config snapshot; build a new one when the config changes."""

    def __init__(self, cfg: PipelineConfig, topics: Topics, codec: AvroCodec) -> None:
        self.topics = topics
        self.codec = codec
        self.update(cfg)

    def update(self, cfg: PipelineConfig) -> None:
        """Route by `cfg` from the next batch on (one attribute swap, safe from any thread)."""
        self.routes = {
            src: tuple((dest, self.topics.destination(dest).main) for dest in dests)
            for src, dests in cfg.routes().items()
        }

    def route(self, batch: Sequence[Incoming]) -> Routed:
        """Decode each record, copy it to each destination of its source, reject what fails."""
        out = Routed()
        outputs = out.outputs
        for rec in batch:
            try:
                event = self.codec.decode(rec.value)
            except SchemaError as exc:
                outputs.setdefault(self.topics.rejected, []).append(
                    (rec.key, rec.value, _rejection_headers(rec, str(exc)))
                )
                out.rejected += 1
                continue
            dests = self.routes.get(event["source_id"], ())
            if not dests:
                out.unrouted += 1
                continue
            for dest, topic in dests:
                # The envelope is forwarded as it came: no re-encoding on the hot path.
                outputs.setdefault(topic, []).append((rec.key, rec.value, None))
                out.delivered[dest] = out.delivered.get(dest, 0) + 1
        return out


def _rejection_headers(rec: Incoming, reason: str) -> Headers:
    return [
        ("sluice.reason", reason.encode()),
        ("sluice.stage", b"processor"),
        ("sluice.error.class", b"SchemaError"),
        ("sluice.original.topic", rec.topic.encode()),
        ("sluice.original.partition", str(rec.partition).encode()),
        ("sluice.original.offset", str(rec.offset).encode()),
        ("sluice.original.timestamp", str(rec.timestamp_ms).encode()),
    ]
