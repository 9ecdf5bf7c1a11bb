"""`sluice bench processor`: worker events/s from ingest to destination topic, next to a
plain confluent-kafka loop doing the same routing."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from core.settings import KafkaSettings
from ops.benchmarks.baselines import plain_loop_rate
from ops.benchmarks.harness import (
    BENCH_CONFIG,
    BENCH_TRANSFORM_MODULES,
    Bootstrap,
    JsonOut,
    bench_topics,
    committed_total,
    console,
    end_offsets,
    envelopes,
    report,
    seed_topic,
)

# The same with a filter and a user transform on the destination: decode, filter, turn
# the envelope into dicts, call the function, encode again.
TRANSFORM_CONFIG = (
    BENCH_CONFIG
    + """    filter: {deny_types: [page]}
    transform: {function: "ops.benchmarks.processor:enrich"}
"""
)


class Guarantee(StrEnum):
    """The worker's processing guarantees."""

    at_least_once = "at_least_once"
    exactly_once = "exactly_once"


def _finished(
    kafka: KafkaSettings,
    guarantee: Guarantee,
    dest: str,
    group: str,
    ingest: str,
    events: int,
    expected: int,
) -> int:
    """How many of the `expected` output records the worker has finished.

    At least once, the destination topic's end offsets count them. Exactly once, those
    offsets also count each transaction's commit markers; the input offsets the worker
    committed in its transactions count the events instead (scaled to outputs).
    """
    if guarantee is Guarantee.at_least_once:
        return end_offsets(kafka, dest)
    return committed_total(kafka, group, ingest) * expected // events


def enrich(event: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's transform: one property added."""
    event["properties"]["enriched"] = True
    return event


def bench_processor(
    events: Annotated[int, typer.Option(help="Events to process.")] = 200_000,
    transform: Annotated[
        bool, typer.Option(help="Route through a filter and a user transform as well.")
    ] = False,
    guarantee: Annotated[
        Guarantee,
        typer.Option(
            help="The worker's processing guarantee (SLUICE_WORKER_PROCESSING_GUARANTEE)."
        ),
    ] = Guarantee.at_least_once,
    bootstrap: Bootstrap = None,
    json_out: JsonOut = None,
) -> None:
    """Worker (Faust) events/s from ingest to destination topic, next to a plain confluent-kafka loop."""

    from core.topics import Topics  # noqa: PLC0415
    from ops.processes import BackgroundProcess  # noqa: PLC0415

    kafka, _ = bench_topics(bootstrap or KafkaSettings().bootstrap_servers)
    topics = Topics(kafka.topic_prefix)
    dest = topics.destination("warehouse").main
    records = envelopes(events)
    seed_topic(kafka, topics.ingest, records)
    results: dict[str, Any] = {
        "events": events,
        "cores": os.cpu_count(),
        "transform": transform,
        "guarantee": guarantee.value,
    }
    config_text = TRANSFORM_CONFIG if transform else BENCH_CONFIG
    with console.status("baseline: plain confluent-kafka consume -> route -> produce loop ..."):
        results["plain_loop_events_per_s"], expected = plain_loop_rate(
            kafka, topics.ingest, config_text, events
        )
    results["routed"] = expected
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-worker-"))
    config = workdir / "sluice.yaml"
    config.write_text(config_text)
    service = BackgroundProcess("worker", workdir)
    group = f"{kafka.topic_prefix}-worker"
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("sluice worker", total=expected)
            service.start(
                ["worker"],
                {
                    "SLUICE_CONFIG_FILE": str(config),
                    "SLUICE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                    "SLUICE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
                    "SLUICE_WORKER_APP_ID": group,
                    "SLUICE_WORKER_PROCESSING_GUARANTEE": guarantee.value,
                    "SLUICE_WORKER_DATA_DIR": str(workdir / "data"),
                    "SLUICE_TRANSFORM_MODULES": BENCH_TRANSFORM_MODULES,
                },
            )
            first = 0.0
            while True:
                done = _finished(kafka, guarantee, dest, group, topics.ingest, events, expected)
                progress.update(task, completed=done)
                if done and not first:
                    first, base = time.perf_counter(), done
                if done >= expected:
                    break
                if service.pid() is None:
                    console.print(f"[red]the worker exited:[/red]\n{service.tail()}")
                    raise typer.Exit(1)
                time.sleep(0.2)
            # Counted as input events, like the baseline: the filter's drops are work done too.
            rate = (expected - base) / (time.perf_counter() - first)
            results["worker_events_per_s"] = rate * events / expected
    finally:
        service.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    table = Table(title=f"Processor ({results['cores']} cores, broker on this machine)")
    table.add_column("setup")
    table.add_column("events/s", justify="right")
    work = "decode, filter, transform, route" if transform else "decode, route"
    table.add_row(
        f"plain confluent-kafka loop: consume, {work}, produce (baseline)",
        f"{results['plain_loop_events_per_s']:,.0f}",
    )
    table.add_row(
        f"sluice worker ({guarantee.value}: Faust agent, batched delivery + batch produce, uvloop)",
        f"{results['worker_events_per_s']:,.0f}",
    )
    report(table, results, json_out)
