"""The gateway's OpenAPI 3.0 document, served at `/openapi.json`."""

from __future__ import annotations

from typing import Any

from core.job_stats import RATES
from core.jobs import STATES
from gateway.envelope import EVENT_TYPES

_TS = {"type": "string", "format": "date-time"}
_OBJ = {"type": "object", "additionalProperties": True}

MESSAGE: dict[str, Any] = {
    "type": "object",
    "description": "A Segment/RudderStack message. userId or anonymousId is required.",
    "properties": {
        "type": {"type": "string", "enum": sorted(EVENT_TYPES - {"webhook"})},
        "messageId": {"type": "string"},
        "userId": {"type": "string"},
        "anonymousId": {"type": "string"},
        "event": {"type": "string", "description": "track: the event name"},
        "name": {"type": "string", "description": "page/screen: the name"},
        "groupId": {"type": "string"},
        "previousId": {"type": "string"},
        "properties": _OBJ,
        "traits": _OBJ,
        "context": _OBJ,
        "integrations": _OBJ,
        "timestamp": _TS,
        "originalTimestamp": _TS,
        "sentAt": _TS,
    },
    "additionalProperties": True,
}

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
_ACCEPTED = {
    "type": "object",
    "properties": {
        "accepted": {"type": "integer", "minimum": 0},
        "rejected": {
            "type": "array",
            "description": "Invalid messages by index; every other message was accepted.",
            "items": {
                "type": "object",
                "properties": {"index": {"type": "integer"}, "reason": {"type": "string"}},
                "required": ["index", "reason"],
            },
        },
    },
    "required": ["accepted", "rejected"],
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON, too deeply nested, or every event invalid",
        401: "Unknown, disabled or missing write key",
        413: "Body (after decompression) over the limit",
        429: "The source's rate limit; see Retry-After",
        503: "Kafka did not confirm the write; retry after Retry-After",
    }
    responses = {str(c): _json(_ERROR, text[c]) for c in codes}
    if 400 in codes:
        # A batch whose every event is invalid answers 400 with the per-event reasons.
        responses["400"] = _json({"anyOf": [_ERROR, _ACCEPTED]}, text[400])
    return responses


def _ingest(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"writeKey": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "200": _json(_ACCEPTED, "Every accepted event is durable in Kafka"),
                **_errors(400, 401, 413, 429, 503),
            },
        }
    }


JOB: dict[str, Any] = {
    "type": "object",
    "description": "One job. `delay_ms` and `run_at` exclude each other.",
    "properties": {
        "queue": {"type": "string", "maxLength": 64},
        "payload": {"description": "Any JSON value: the job's input"},
        "priority": {"type": "integer", "minimum": 0, "maximum": 9, "default": 0},
        "delay_ms": {"type": "integer", "minimum": 0},
        "run_at": _TS,
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
        "timeout_ms": {"type": "integer", "minimum": 1},
        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 256},
        "ordering_key": {"type": "string", "minLength": 1, "maxLength": 256},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 64}, "maxItems": 20},
    },
    "required": ["queue"],
    "additionalProperties": False,
}
_SUBMITTED = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "queue": {"type": "string"},
        "state": {"type": "string", "enum": ["PENDING", "SCHEDULED"]},
    },
    "required": ["id", "queue", "state"],
}
_JOB_ERRORS = {
    "400": "Malformed JSON or an invalid job (the reason names it)",
    "401": "Unknown or missing submit key",
    "403": "The key may not submit to this queue",
    "404": "No such queue",
    "413": "Body, payload or batch over the limit",
    "503": "Kafka did not confirm the write; retry after Retry-After",
}


def _submit(summary: str, body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"submitKey": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "202": _json(answer, "Every job is durable in Kafka"),
                **{code: _json(_ERROR, text) for code, text in _JOB_ERRORS.items()},
            },
        }
    }


_STATUS = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "queue": {"type": "string"},
        "state": {"type": "string"},
        "attempt": {"type": "integer"},
        "history": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["id", "queue", "state", "attempt", "history"],
}
_COUNT = {"type": "integer", "minimum": 0}
_RATE = {"type": "number", "minimum": 0, "description": "Per second over the window"}
_MS = {"type": "integer", "minimum": 0, "nullable": True}
_PERCENTILES = {
    "type": "object",
    "properties": {"p50": _MS, "p90": _MS, "p99": _MS},
    "required": ["p50", "p90", "p99"],
}
_QUEUE = {
    "type": "object",
    "properties": {
        "queue": {"type": "string"},
        "counts": {
            "type": "object",
            "description": "Jobs by state (their statuses in the gateway's table)",
            "properties": dict.fromkeys(STATES, _COUNT),
            "required": list(STATES),
        },
        "in_flight": {**_COUNT, "description": "Jobs ACTIVE now"},
        "rates": {
            "type": "object",
            "description": "Transitions per second over the last window_s seconds",
            "properties": {"window_s": _COUNT} | dict.fromkeys(RATES, _RATE),
            "required": ["window_s", *RATES],
        },
        "latency": {
            "type": "object",
            "description": (
                "Attempts that ended in the last window_s seconds (the latest 1000): wait ="
                " started - (due or submitted), run = ended - started, in ms; null without"
                " attempts"
            ),
            "properties": {
                "window_s": _COUNT,
                "attempts": _COUNT,
                "wait_ms": _PERCENTILES,
                "run_ms": _PERCENTILES,
            },
            "required": ["window_s", "attempts", "wait_ms", "run_ms"],
        },
    },
    "required": ["queue", "counts", "in_flight", "rates", "latency"],
}
_READ_ERRORS = {
    "400": "An invalid query parameter (the reason names it)",
    "401": "Unknown or missing submit key",
    "403": "The key may not use this queue",
    "404": "No such job or queue",
    "503": "The job statuses are not read to their end yet; retry after Retry-After",
}


def _read(summary: str, answer: dict[str, Any], parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": [{"submitKey": []}],
            "parameters": parameters,
            "responses": {
                "200": _json(answer, "OK"),
                **{code: _json(_ERROR, text) for code, text in _READ_ERRORS.items()},
            },
        }
    }


def _param(name: str, where: str, schema: dict[str, Any], required: bool) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema}


def openapi_document() -> dict[str, Any]:
    """The whole OpenAPI document of the gateway."""
    paths: dict[str, Any] = {
        "/v1/batch": _ingest(
            "Many messages of any type",
            {
                "type": "object",
                "properties": {
                    "batch": {"type": "array", "items": MESSAGE},
                    "writeKey": {"type": "string"},
                    "sentAt": _TS,
                },
                "required": ["batch"],
            },
        ),
        "/v1/webhook": _ingest("Any JSON body, wrapped as a webhook event of the source", _OBJ),
    }
    for etype in ("track", "identify", "page", "screen", "group", "alias"):
        paths[f"/v1/{etype}"] = _ingest(f"One {etype} message", MESSAGE)
    paths["/v1/jobs"] = _submit("Submit one job", JOB, _SUBMITTED)
    paths["/v1/jobs/batch"] = _submit(
        "Submit many jobs: all are stored, or none",
        {
            "type": "object",
            "properties": {"jobs": {"type": "array", "items": JOB, "minItems": 1}},
            "required": ["jobs"],
        },
        {
            "type": "object",
            "properties": {"jobs": {"type": "array", "items": _SUBMITTED}},
            "required": ["jobs"],
        },
    )
    paths["/v1/jobs"].update(
        _read(
            "A queue's jobs, the latest updated first",
            {
                "type": "object",
                "properties": {"jobs": {"type": "array", "items": _STATUS}},
                "required": ["jobs"],
            },
            [
                _param("queue", "query", {"type": "string"}, True),
                _param("state", "query", {"type": "string"}, False),
                _param("limit", "query", {"type": "integer", "minimum": 1}, False),
            ],
        )
    )
    paths["/v1/jobs/{id}"] = _read(
        "A job's latest state and its history",
        _STATUS,
        [_param("id", "path", {"type": "string"}, True)],
    )
    paths["/v1/jobs/{id}"]["delete"] = {
        "summary": "Cancel a job that is not finished (a running attempt is ended)",
        "security": [{"submitKey": []}],
        "parameters": [
            _param("id", "path", {"type": "string"}, True),
            _param("queue", "query", {"type": "string"}, False),
        ],
        "responses": {
            "200": _json(_STATUS, "Cancelled: it never runs (again)"),
            "202": _json({"type": "object"}, "Sent; the job's worker has not answered yet"),
            **{
                code: _json(_ERROR, text)
                for code, text in {
                    **_READ_ERRORS,
                    "409": "The job is finished",
                }.items()
            },
        },
    }
    paths["/v1/queues/{queue}"] = _read(
        "A queue's jobs by state, in flight, rates and wait and run time percentiles",
        _QUEUE,
        [_param("queue", "path", {"type": "string"}, True)],
    )
    paths["/v1/queues"] = _read(
        "The figures of every queue the submit key may use",
        {
            "type": "object",
            "properties": {"queues": {"type": "array", "items": _QUEUE}},
            "required": ["queues"],
        },
        [],
    )
    paths["/v1/stats"] = _read(
        "Per queue: depth, throughput, success and failure rates, processing times",
        {
            "type": "object",
            "properties": {"queues": {"type": "array", "items": {"type": "object"}}},
            "required": ["queues"],
        },
        [],
    )
    ok = {"200": _json({"type": "object"}, "OK")}
    paths["/health"] = {"get": {"summary": "The process is up", "responses": ok}}
    paths["/ready"] = {
        "get": {
            "summary": "Kafka answers",
            "responses": {**ok, "503": _json({"type": "object"}, "Kafka unreachable")},
        }
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "Sluice gateway", "version": "0.1.0"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "writeKey": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "The write key as the username, an empty password",
                },
                "submitKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A submit key of the queue (`submit_keys` in the config)",
                },
            }
        },
    }
