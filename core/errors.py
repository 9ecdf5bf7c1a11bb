"""Sluice's error model: the class says whether a failure is worth retrying."""

from __future__ import annotations

from typing import ClassVar


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose.

    `retriable` says whether the same operation can succeed later; `retry_after` is how
    long the other side asked to wait (seconds), when it said.
    """

    retriable: ClassVar[bool] = False
    retry_after: float | None = None


class SchemaError(SluiceError):
    """A record does not match its schema or wire format; retrying cannot help."""


class ConfigError(SluiceError):
    """The pipeline configuration is invalid."""


class BrokerUnavailable(SluiceError):
    """Kafka did not confirm a write in time."""

    retriable = True


class RecordRefused(SluiceError):
    """Kafka refused a record for good (too large, invalid, not authorised): to a DLQ with it."""


class TopicError(SluiceError):
    """A topic could not be created or changed."""
