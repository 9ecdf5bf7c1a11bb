"""The errors of `streams/`: each class says whether retrying can help (`retriable`)."""

from __future__ import annotations

from confluent_kafka import KafkaError

from core.errors import SchemaError, SluiceError
from core.kafka import Record


class Fenced(SluiceError):
    """Another worker owns the partition now: this worker's outputs for it were aborted."""


class Refused(SluiceError):
    """Kafka refused records of a transaction for good; the transaction was aborted.

    `records` names each: its output topic, the record itself (the object the caller
    passed) and the error.
    """

    def __init__(self, records: list[tuple[str, Record, KafkaError]]) -> None:
        super().__init__(f"{len(records)} records refused: {records[0][2].str()}")
        self.records = records


class TransformTimeout(SluiceError):
    """The transform ran past its time limit."""


class TransformResultError(SluiceError, TypeError):
    """The transform returned something that is not an event, a list of events or None."""


class UnknownSource(SchemaError):
    """An event names a source that the current config does not have."""


class TrackingPlanViolation(SchemaError):
    """A track event breaks its source's tracking plan (and the plan says reject)."""
