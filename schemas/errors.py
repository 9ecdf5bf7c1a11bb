"""Sluice's error model: the class says whether a failure is worth retrying."""

from __future__ import annotations

from typing import ClassVar


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""

    retriable: ClassVar[bool] = False


class SchemaError(SluiceError):
    """A record does not match its schema or wire format; retrying cannot help."""


class ConfigError(SluiceError):
    """The pipeline configuration is invalid."""


class DestinationUnavailable(SluiceError):
    """A destination could not take the write now; try again later."""

    retriable = True

    def __init__(self, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


class BrokerUnavailable(SluiceError):
    """Kafka did not confirm a write in time."""

    retriable = True


class RecordRefused(SluiceError):
    """Kafka refused a record for good (too large, invalid, not authorised): to a DLQ with it."""
