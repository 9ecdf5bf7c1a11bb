"""What a failure means for the warehouse sink: refused for good, worth another try, or fatal.

A load the warehouse refuses for good (`refusal` returns the error) is halved until the
records behind it are found and dead-lettered; a transient one (None) is retried in place.
A fatal Kafka error (`fatal`) leaves the consumer unusable: the sink's loop must end.
"""

from __future__ import annotations

from clickhouse_connect.driver.exceptions import ClickHouseError
from confluent_kafka import KafkaError, KafkaException

from connectors.errors import WarehouseRefused
from connectors.warehouse.clickhouse import warehouse_error
from core.errors import SluiceError


class Refused(Exception):
    """A load attempt was refused for good; `written` are the tables it wrote before."""

    def __init__(self, error: SluiceError, written: frozenset[str]) -> None:
        super().__init__(str(error))
        self.error = error
        self.written = written


def refusal(exc: Exception) -> SluiceError | None:
    """`exc` as a permanent refusal of a load, None when it is transient (or a bug)."""
    if isinstance(exc, ClickHouseError | OSError):
        exc = warehouse_error(exc, "warehouse")
    if isinstance(exc, SluiceError):
        return None if exc.retriable else exc
    if isinstance(exc, ValueError | TypeError | ArithmeticError):
        # Client-side: a property that is not JSON, a value no column type can take.
        return WarehouseRefused(f"the batch cannot be loaded: {type(exc).__name__}: {exc}")
    return None


def fatal(exc: Exception) -> bool:
    """Whether a Kafka error leaves the consumer unusable (fenced, say)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL)
