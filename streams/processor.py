"""The processor's pure logic: decode an ingested event and route it to its destinations.

No Faust here: the agent hands batches in and produces what comes out.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from core.config import EventFilter, PipelineConfig, resolve_transforms
from core.errors import SchemaError
from core.headers import Failure, Origin, failure_headers
from core.kafka import Headers
from core.settings import TransformSettings
from core.topics import Topics
from schemas.codec import AvroCodec
from streams.errors import TrackingPlanViolation, UnknownSource
from streams.rules import (
    TransformFn,
    flag,
    for_user,
    from_user,
    passes,
    plan_violations,
    time_limits,
)

OutRecord = tuple[bytes | None, bytes, Headers | None]


class Incoming(NamedTuple):
    """One record taken from the ingest topic (a tuple: built for every event)."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class DeadLetter(NamedTuple):
    """What goes to a DLQ in place of a refused output; `refused_for`: its destination."""

    topic: str
    record: OutRecord
    refused_for: str | None


@dataclass
class Routed:
    """What one batch turns into: records per output topic, and counts for metrics."""

    outputs: dict[str, list[tuple[bytes | None, bytes, Headers | None]]] = field(
        default_factory=dict
    )
    # The input record of each output, in the same order: what a refused output's DLQ
    # record carries.
    origins: dict[str, list[Incoming]] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    # Events a destination's transform returned from (with one event, a list or None).
    transformed: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    unrouted: int = 0
    flagged: int = 0
    # Records of sources this config does not know (yet): route them again once the
    # worker has read the config topic to its end.
    unknown: list[Incoming] = field(default_factory=list)


@dataclass(frozen=True)
class Route:
    """One destination of a source: its topics, filter and transform."""

    destination: str
    topic: str
    dlq: str
    filter: EventFilter
    transform: TransformFn | None = None
    timeout_s: float = 1.0

    @property
    def plain(self) -> bool:
        """Nothing to check or change: the record is forwarded as it came."""
        return self.transform is None and self.filter == _NO_FILTER


_NO_FILTER = EventFilter()


def _bump(counts: dict[str, int], key: str, by: int = 1) -> None:
    counts[key] = counts.get(key, 0) + by


class Router:
    """Routes by source id from a config snapshot; build a new one when the config changes.

    Transforms are imported here, and only from the modules `transforms` allows.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        topics: Topics,
        codec: AvroCodec,
        transforms: TransformSettings,
    ) -> None:
        self.topics = topics
        self.codec = codec
        self.transforms = transforms
        self.update(cfg)

    def update(self, cfg: PipelineConfig) -> None:
        """Route by `cfg` from the next batch on (one attribute swap, safe from any thread).

        ConfigError when a transform cannot be imported; the routes in use stay as they were.
        """
        functions = resolve_transforms(cfg, self.transforms)
        by_id: dict[str, Route] = {}
        for dest in cfg.destinations:
            dt = self.topics.destination(dest.id)
            by_id[dest.id] = Route(
                dest.id,
                dt.main,
                dt.dlq,
                dest.filter,
                functions.get(dest.id),
                dest.transform.timeout_s if dest.transform else 1.0,
            )
        routes = {src: tuple(by_id[d] for d in dests) for src, dests in cfg.routes().items()}
        plans = {s.id: s.tracking_plan for s in cfg.sources if s.tracking_plan}
        self.snapshot = (routes, plans)

    def route(self, batch: Sequence[Incoming], final: bool = False) -> Routed:
        """Decode each record, copy it to each destination of its source, reject what fails.

        A record of a source the config does not name goes to `Routed.unknown`: the gateway
        may have accepted a write key that this worker's config has not caught up with.
        With `final` (the config is known to be current) it is rejected with the reason.
        """
        out = Routed()
        outputs, origins = out.outputs, out.origins
        routes, plans = self.snapshot
        with time_limits() as call:
            for rec in batch:
                try:
                    event = self.codec.decode(rec.value)
                except SchemaError as exc:
                    outputs.setdefault(self.topics.rejected, []).append(
                        (rec.key, rec.value, _failure_headers(rec, "processor", exc))
                    )
                    origins.setdefault(self.topics.rejected, []).append(rec)
                    out.rejected += 1
                    continue
                value = rec.value
                plan = plans.get(event["source_id"]) if plans else None
                if plan is not None:
                    problems = plan_violations(plan, event)
                    if problems and plan.on_violation == "reject":
                        reason = TrackingPlanViolation("; ".join(problems))
                        outputs.setdefault(self.topics.rejected, []).append(
                            (rec.key, value, _failure_headers(rec, "processor", reason))
                        )
                        origins.setdefault(self.topics.rejected, []).append(rec)
                        out.rejected += 1
                        continue
                    if problems:
                        event = flag(event, problems)
                        value = self.codec.encode(event)
                        out.flagged += 1
                dests = routes.get(event["source_id"])
                if dests is None:
                    if not final:
                        out.unknown.append(rec)
                        continue
                    unknown = UnknownSource(f"source {event['source_id']!r} is not in the config")
                    outputs.setdefault(self.topics.rejected, []).append(
                        (rec.key, value, _failure_headers(rec, "processor", unknown))
                    )
                    origins.setdefault(self.topics.rejected, []).append(rec)
                    out.rejected += 1
                    continue
                if not dests:
                    out.unrouted += 1
                    continue
                for route in dests:
                    if route.plain:
                        # The envelope is forwarded as it came: no re-encoding on the hot path.
                        outputs.setdefault(route.topic, []).append((rec.key, value, None))
                        origins.setdefault(route.topic, []).append(rec)
                        _bump(out.delivered, route.destination)
                    elif not passes(route.filter, event):
                        _bump(out.filtered, route.destination)
                    elif route.transform is None:
                        outputs.setdefault(route.topic, []).append((rec.key, value, None))
                        origins.setdefault(route.topic, []).append(rec)
                        _bump(out.delivered, route.destination)
                    else:
                        self._transform(rec, event, route, call, out)
        return out

    def dead_letter(
        self,
        topic: str,
        record: OutRecord,
        origin: Incoming,
        error: Exception,
        whole_topic: bool = False,
    ) -> DeadLetter | None:
        """Where an output that Kafka refused for good goes instead, and as what.

        An output of a destination goes to the destination's DLQ as its input event came
        in, with the failure headers (stage `produce`). A dead letter or rejected record
        refused in turn (its topic takes smaller records than the input's) goes to the same
        topic without its value: the headers say where to read the event. None when even
        that was refused, or when the whole topic refuses records (`whole_topic`: missing
        or not allowed): nothing smaller helps, so the caller keeps trying.
        """
        destinations = f"{self.topics.prefix}.dest."
        if topic.startswith(destinations) and not topic.endswith(".dlq"):
            destination = topic[len(destinations) :]
            headers = _failure_headers(origin, "produce", error, destination)
            dlq = self.topics.destination(destination).dlq
            return DeadLetter(dlq, (origin.key, origin.value, headers), destination)
        if not record[1] or whole_topic:
            return None
        named = topic[len(destinations) : -len(".dlq")] if topic.startswith(destinations) else None
        headers = _failure_headers(origin, "produce", error, named)
        headers.append(("sluice.value.omitted", b"true"))
        return DeadLetter(topic, (origin.key, b"", headers), None)

    def _transform(
        self,
        rec: Incoming,
        event: dict[str, Any],
        route: Route,
        call: Callable[[TransformFn, dict[str, Any], float], Any],
        out: Routed,
    ) -> None:
        assert route.transform is not None
        try:
            results = from_user(call(route.transform, for_user(event), route.timeout_s))
            values = [self.codec.encode(e) for e in results]
        except Exception as exc:  # a user function may raise anything: it goes to the DLQ
            headers = _failure_headers(
                rec, "transform", exc, route.destination, traceback.format_exc()
            )
            out.outputs.setdefault(route.dlq, []).append((rec.key, rec.value, headers))
            out.origins.setdefault(route.dlq, []).append(rec)
            _bump(out.failed, route.destination)
            return
        _bump(out.transformed, route.destination)
        if not values:
            _bump(out.dropped, route.destination)
        if values:
            records = out.outputs.setdefault(route.topic, [])
            origins = out.origins.setdefault(route.topic, [])
            for value in values:
                records.append((rec.key, value, None))
                origins.append(rec)
        _bump(out.delivered, route.destination, len(values))


def _failure_headers(
    rec: Incoming,
    stage: str,
    error: Exception,
    destination: str | None = None,
    trace: str | None = None,
) -> Headers:
    """The failure headers of a record the worker could not pass on (its first failure)."""
    now = int(time.time() * 1000)
    origin = Origin(rec.topic, rec.partition, rec.offset, rec.timestamp_ms)
    return failure_headers(
        None, origin, Failure(destination, stage, error, 1, now, now), traceback=trace
    )
