"""`sluice bench gateway`: ingestion events/s and ack latency next to a raw producer."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table

from core.settings import KafkaSettings
from ops.benchmarks.baselines import raw_producer_rate
from ops.benchmarks.harness import (
    BENCH_CONFIG,
    Bootstrap,
    JsonOut,
    bench_topics,
    console,
    envelopes,
    report,
)
from ops.benchmarks.load import run_load


def bench_gateway(
    seconds: Annotated[
        float, typer.Option(help="Measured seconds per mode (after 2 s warm-up).")
    ] = 10.0,
    connections: Annotated[int, typer.Option(help="Concurrent HTTP connections.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Events per /v1/batch request.")] = 100,
    baseline_events: Annotated[
        int, typer.Option(help="Events for the raw producer baseline.")
    ] = 500_000,
    bootstrap: Bootstrap = None,
    json_out: JsonOut = None,
) -> None:
    """Gateway events/s and ack latency (batched and single) next to the raw producer."""
    import socket  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from core.topics import Topics  # noqa: PLC0415
    from ops.processes import BackgroundProcess  # noqa: PLC0415
    from ops.traffic import sample_events  # noqa: PLC0415

    kafka, _ = bench_topics(bootstrap or KafkaSettings().bootstrap_servers)
    ingest = Topics(kafka.topic_prefix).ingest
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "connections": connections,
        "batch_size": batch_size,
    }
    with console.status(f"baseline: raw confluent-kafka producer, {baseline_events:,} events ..."):
        results["producer_events_per_s"] = raw_producer_rate(
            kafka, ingest, envelopes(baseline_events)
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    config = workdir / "sluice.yaml"
    config.write_text(BENCH_CONFIG)
    service = BackgroundProcess("gateway", workdir)
    env = {
        "SLUICE_CONFIG_FILE": str(config),
        "SLUICE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SLUICE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "SLUICE_GATEWAY_PORT": str(port),
        "SLUICE_LOG_LEVEL": "WARNING",
    }
    url = f"http://127.0.0.1:{port}"
    try:
        service.start(["gateway"], env)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=2):  # noqa: S310 - loopback
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise typer.Exit(1) from None
                time.sleep(0.2)
        events = sample_events(20_000, users=500, seed=2)
        batches = [
            orjson.dumps({"batch": events[i : i + batch_size]})
            for i in range(0, len(events), batch_size)
        ]
        singles = [orjson.dumps(e) for e in events[:5000]]
        with console.status(
            f"gateway: /v1/batch x{batch_size}, {connections} connections, {seconds:.0f}s ..."
        ):
            results["batched"] = run_load(
                url, "/v1/batch", batches, batch_size, connections, seconds
            )
        with console.status(
            f"gateway: single events (/v1/track), {connections} connections, {seconds:.0f}s ..."
        ):
            results["single"] = run_load(url, "/v1/track", singles, 1, connections, seconds)
    finally:
        service.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    table = Table(title=f"Gateway ingestion ({results['cores']} cores, broker on this machine)")
    for col in ("setup", "events/s", "requests/s", "p50 ms", "p99 ms", "non-200"):
        table.add_column(col, justify="right" if col != "setup" else "left")
    table.add_row(
        "raw confluent-kafka producer (baseline)",
        f"{results['producer_events_per_s']:,.0f}",
        "",
        "",
        "",
        "",
    )
    for name, label in (
        ("batched", f"gateway /v1/batch, {batch_size} events a request"),
        ("single", "gateway /v1/track, 1 event a request"),
    ):
        r = results[name]
        table.add_row(
            label,
            f"{r['events_per_s']:,.0f}",
            f"{r['requests_per_s']:,.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            str(r["failures"]),
        )
    ratio = results["batched"]["events_per_s"] / results["producer_events_per_s"]
    report(table, results, json_out, ("batched gateway / raw producer", ratio))
    if results["batched"]["failures"] or results["single"]["failures"]:
        console.print("[red]some requests failed[/red]")
        raise typer.Exit(1)
