"""Transforms used by the tests, referenced from configs as `tests.transforms:<name>`."""

from __future__ import annotations

import time
from typing import Any


def fan_out(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The event, plus a copy with its own id and a flag in its properties."""
    copy = {**event, "event_id": event["event_id"] + "-copy"}
    copy["properties"] = {**event["properties"], "copied": True}
    return [event, copy]


def drop_pages(event: dict[str, Any]) -> dict[str, Any] | None:
    """Pages are dropped; other events get their name upper-cased."""
    if event["type"] == "page":
        return None
    if event["event"]:
        event["event"] = event["event"].upper()
    return event


def explode(event: dict[str, Any]) -> dict[str, Any]:
    """Fails for identify events."""
    if event["type"] == "identify":
        raise ValueError(f"cannot handle {event['event_id']}")
    return event


def slow(event: dict[str, Any]) -> dict[str, Any]:
    """Takes far longer than any test's time limit."""
    time.sleep(5)
    return event


def not_an_event(_event: dict[str, Any]) -> str:
    """Returns something that is not an event."""
    return "oops"


def inflate(event: dict[str, Any]) -> dict[str, Any]:
    """Events whose properties say `inflate` grow past any Kafka message size limit (2 MB)."""
    if event["properties"].get("inflate"):
        event["properties"] = {**event["properties"], "blob": "x" * 2_000_000}
    return event


def stall(event: dict[str, Any]) -> dict[str, Any]:
    """Events whose properties say `stall` take 8 s (give the transform a longer limit)."""
    if event["properties"].get("stall"):
        time.sleep(8)
    return event
