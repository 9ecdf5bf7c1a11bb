"""schemathesis against the gateway's own /openapi.json, over real HTTP with the real broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from core.admin import apply_topics
from core.config import load_config
from core.settings import KafkaSettings
from core.topics import required_topics
from gateway.openapi import openapi_document
from ops.traffic import basic_auth
from tests.configs import SUBMIT_KEY, Configs
from tests.pipeline import Pipeline, http_json

pytestmark = pytest.mark.integration

schema = schemathesis.openapi.from_dict(openapi_document())
FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


@pytest.fixture(scope="module")
def gateway(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    configs = Configs()
    config = configs.text(configs.warehouse(), queues=[configs.queue("work", priorities=3)])
    pipe = Pipeline(tmp_path_factory.mktemp("contract"), broker, prefix, config=config)
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    cfg = load_config(Path(pipe.env["SLUICE_CONFIG_FILE"]))
    apply_topics(required_topics(cfg, kafka), kafka)
    pipe.start("gateway")
    yield pipe
    pipe.stop()


def _credential(case: schemathesis.Case[Any], gateway: Pipeline) -> str:
    """The valid key of the operation: a submit key for the jobs API, else the write key."""
    if case.operation.path.startswith(("/v1/jobs", "/v1/queues")):
        return f"Bearer {SUBMIT_KEY}"
    return basic_auth(gateway.write_key)


def test_the_served_document_is_the_one_tested(gateway: Pipeline) -> None:
    assert http_json(f"{gateway.gateway_url}/openapi.json") == openapi_document()


@schema.parametrize()
@FUZZ
def test_no_server_errors_and_responses_match_the_schema(
    case: schemathesis.Case[Any], gateway: Pipeline
) -> None:
    # Whether a schema-valid message is accepted also depends on rules a schema cannot say
    # (userId or anonymousId, an event name for track): the test checks the contract instead.
    case.call_and_validate(
        base_url=gateway.gateway_url,
        headers={"Authorization": _credential(case, gateway)},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


@schema.parametrize()
@FUZZ
def test_nothing_is_accepted_without_a_valid_key(
    case: schemathesis.Case[Any], gateway: Pipeline
) -> None:
    if not case.operation.path.startswith("/v1/"):
        return
    wrong = (basic_auth("not-" + gateway.write_key), f"Bearer not-{SUBMIT_KEY}")
    for headers in ({}, *({"Authorization": value} for value in wrong)):
        response = case.call(base_url=gateway.gateway_url, headers=headers, params={})
        assert 400 <= response.status_code < 500, response.text
