"""What the warehouse sink loads: one target per ClickHouse destination of the config."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ClickHouseConfig, PipelineConfig
from core.settings import WarehouseSettings
from core.topics import Topics


@dataclass(frozen=True)
class SinkTarget:
    """A destination topic, the raw table its events land in, and whether to fan out."""

    destination: str
    topic: str
    table: str
    layout: bool = True
    # The destination's DLQ (`DestinationTopics.dlq`); by default the topic's `.dlq`.
    dlq_topic: str | None = None

    @property
    def dlq(self) -> str:
        """Where records of this destination that cannot be loaded go."""
        return self.dlq_topic or f"{self.topic}.dlq"


def sink_targets(
    cfg: PipelineConfig, topics: Topics, settings: WarehouseSettings
) -> list[SinkTarget]:
    """One target per ClickHouse destination: its topic and table (`settings.table` by default)."""
    targets = []
    for dest in cfg.destinations:
        connector = dest.connector()
        if isinstance(connector, ClickHouseConfig):
            table = str(dest.settings.get("table", settings.table))
            dt = topics.destination(dest.id)
            targets.append(SinkTarget(dest.id, dt.main, table, connector.layout, dt.dlq))
    return targets
