"""Pipeline configs for tests, built from parts rather than YAML pasted into each test file.

`Configs` (the `configs` fixture) makes sources and destinations as dicts with the
defaults the tests share (the source `test-src`, the destinations `warehouse` and `hook`);
a test names only what it is about. `text()` gives YAML for the processes of a
`tests.pipeline.Pipeline` (the placeholder `KEY` stands for the pipeline's write key),
`model()` gives the parsed `PipelineConfig`. Tests of the config parser itself keep their
YAML: there the text is the input under test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from core.config import PipelineConfig, parse_config
from core.settings import TransformSettings

# The pipeline's write key: `Pipeline` puts its own in place of this.
KEY = "{key}"
SOURCE = "test-src"
# The submit key of the tests' job queues.
SUBMIT_KEY = "test-submit-key"


class Configs:
    """Sources, destinations and whole configs; every keyword is a config field as is."""

    def source(
        self, id: str = SOURCE, keys: Sequence[str] = (KEY,), **fields: Any
    ) -> dict[str, Any]:
        return {"id": id, "write_keys": list(keys), **fields}

    def warehouse(
        self, id: str = "warehouse", sources: Sequence[str] = (SOURCE,), **fields: Any
    ) -> dict[str, Any]:
        """A ClickHouse destination; `settings=` for its table or layout."""
        return {"id": id, "type": "clickhouse", "sources": list(sources), **fields}

    def webhook(
        self,
        url: str,
        id: str = "hook",
        sources: Sequence[str] = (SOURCE,),
        retry: dict[str, Any] | None = None,
        filter: dict[str, Any] | None = None,
        transform: dict[str, Any] | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """A webhook destination posting to `url`; other keywords are its settings."""
        dest: dict[str, Any] = {
            "id": id,
            "type": "webhook",
            "sources": list(sources),
            "settings": {"url": url, **settings},
        }
        for name, value in (("retry", retry), ("filter", filter), ("transform", transform)):
            if value is not None:
                dest[name] = value
        return dest

    def queue(
        self, name: str = "work", keys: Sequence[str] = (SUBMIT_KEY,), **fields: Any
    ) -> dict[str, Any]:
        """A job queue that `keys` may submit to; other keywords are its fields."""
        return {"name": name, "submit_keys": list(keys), **fields}

    def text(
        self,
        *destinations: dict[str, Any],
        sources: Sequence[dict[str, Any]] | None = None,
        queues: Sequence[dict[str, Any]] = (),
        workflows: dict[str, Any] | None = None,
    ) -> str:
        """The YAML of a config with these destinations (and `test-src` unless `sources`)."""
        body: dict[str, Any] = {
            "sources": list(sources) if sources is not None else [self.source()],
            "destinations": list(destinations),
        }
        if queues:
            body["queues"] = list(queues)
        if workflows is not None:
            body["workflows"] = workflows
        return yaml.safe_dump(body, sort_keys=False, allow_unicode=True)

    def model(
        self,
        *destinations: dict[str, Any],
        sources: Sequence[dict[str, Any]] | None = None,
        key: str = "test-key",
        transforms: TransformSettings | None = None,
    ) -> PipelineConfig:
        """The parsed config, with `key` for the placeholder."""
        return parse_config(
            self.text(*destinations, sources=sources).replace(KEY, key), transforms=transforms
        )
