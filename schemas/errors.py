"""The errors of `schemas/`: each class says whether retrying can help (`retriable`)."""

from __future__ import annotations

from core.errors import SluiceError


class RegistryError(SluiceError):
    """A request the registry refuses, with the HTTP status and Confluent error code."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
