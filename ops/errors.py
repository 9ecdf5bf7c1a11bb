"""The errors of `ops/`: each class says whether retrying can help (`retriable`)."""

from __future__ import annotations

from core.errors import SluiceError


class ReplayError(SluiceError):
    """A replay could not be done."""


class BrokerError(SluiceError):
    """The local broker could not be resolved, started or stopped."""


class ProcessError(SluiceError):
    """A background process (`ops.processes`) did not start or stop as asked."""


class DlqError(SluiceError):
    """A DLQ operation could not be done."""
