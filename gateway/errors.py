"""The errors of `gateway/`: each class says whether retrying can help (`retriable`)."""

from __future__ import annotations


class InvalidEvent(ValueError):
    """The message cannot become an event; the text is the reason shown to the client."""
