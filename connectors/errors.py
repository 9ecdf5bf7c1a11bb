"""The errors of `connectors/`: each class says whether retrying can help (`retriable`)."""

from __future__ import annotations

from typing import ClassVar

from core.errors import SluiceError


class DestinationUnavailable(SluiceError):
    """A destination could not take the write now; try again later."""

    retriable = True

    def __init__(self, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


class WarehouseRefused(SluiceError):
    """The warehouse refused a statement or its data for good: the same write fails again.

    Bad data the engine or the client cannot encode (an integer beyond a column's range, a
    value its type cannot take), a statement over the query size limit, an unknown type.
    The sink finds the records behind it and dead-letters them; `code` is ClickHouse's.
    """

    def __init__(self, msg: str, code: int | None = None) -> None:
        super().__init__(msg)
        self.code = code


class DeliveryRejected(SluiceError):
    """The destination refused the request for good (a 4xx other than 408/429)."""


class SecretUnavailable(DeliveryRejected):
    """A `${NAME}` of the settings is not allowed here, or not set in this process."""


class RedirectRefused(DeliveryRejected):
    """A redirect that is not followed: redirects are off, or it leaves the URL's origin."""


class TargetRefused(DeliveryRejected):
    """The target's address is not public and SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS is on."""


class QueryRefused(SluiceError):
    """A statement the query endpoint does not run: a write, a file, a URL, another server."""


class QueryFailed(SluiceError):
    """The engine stopped or refused a query; `reason` says which kind of failure."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class QueryTimeout(QueryFailed):
    """The query ran into `max_execution_time`."""

    retriable: ClassVar[bool] = True
