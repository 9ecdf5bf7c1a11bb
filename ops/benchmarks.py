"""`sluice bench`: throughput of Sluice's stages, each next to a baseline measured in the same run."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from core.settings import KafkaSettings, TransformSettings
from ops.output import fail

Bootstrap = Annotated[str | None, typer.Option(help="Kafka bootstrap servers.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the results here.")]

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks against same-run baselines.")
console = Console()

BENCH_CONFIG = """
sources:
  - id: bench
    write_keys: [bench-key]
destinations:
  - id: warehouse
    type: clickhouse
    sources: [bench]
"""
# The same with a filter and a user transform on the destination: decode, filter, turn
# the envelope into dicts, call the function, encode again.
TRANSFORM_CONFIG = (
    BENCH_CONFIG
    + """    filter: {deny_types: [page]}
    transform: {function: "ops.benchmarks:enrich"}
"""
)


# Where the benchmark's transform lives: the only module its routers may import from.
BENCH_TRANSFORM_MODULES = "ops.benchmarks"


def enrich(event: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's transform: one property added."""
    event["properties"]["enriched"] = True
    return event


def _topics(bootstrap: str) -> tuple[KafkaSettings, Any]:
    from core.admin import apply_topics  # noqa: PLC0415
    from core.config import parse_config  # noqa: PLC0415
    from core.topics import required_topics  # noqa: PLC0415

    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:8]}")
    cfg = parse_config(BENCH_CONFIG)
    apply_topics(required_topics(cfg, kafka), kafka)
    return kafka, cfg


def _envelopes(count: int) -> list[tuple[bytes, bytes]]:
    from gateway.envelope import build_event, partition_key  # noqa: PLC0415
    from ops.traffic import sample_events  # noqa: PLC0415
    from schemas.codec import event_codec  # noqa: PLC0415

    codec, now = event_codec(), int(time.time() * 1000)
    out = []
    for msg in sample_events(count, users=500, seed=1):
        event = build_event(msg, "bench", now)
        out.append((partition_key(event), codec.encode(event)))
    return out


def raw_producer_rate(
    kafka: KafkaSettings, topic: str, records: list[tuple[bytes, bytes]]
) -> float:
    """Events/s of a bare confluent-kafka producer (idempotent, acks=all, linger 5 ms, lz4)."""
    from confluent_kafka import Producer  # noqa: PLC0415

    producer = Producer(
        kafka.client_config()
        | {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    started = time.perf_counter()
    for i, (key, value) in enumerate(records):
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(120)
    return len(records) / (time.perf_counter() - started)


def seed_topic(kafka: KafkaSettings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Produce the benchmark's input, with a progress bar; waits for the broker's confirmations."""
    from confluent_kafka import Producer  # noqa: PLC0415

    producer = Producer(kafka.client_config() | {"linger.ms": 20, "compression.type": "lz4"})
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"producing to {topic}", total=len(records))
        for i, (key, value) in enumerate(records):
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    producer.poll(0.05)
            if i % 10_000 == 0:
                producer.poll(0)
                progress.update(task, completed=i)
        if producer.flush(120):
            fail(f"{topic}: the broker did not confirm every input record")
        progress.update(task, completed=len(records))


def _load(
    url: str,
    path: str,
    bodies: list[bytes],
    events_per_body: int,
    connections: int,
    seconds: float,
    out: Any,
) -> None:
    """Load generator (runs in its own process): posts for `seconds`, reports via `out`."""
    import aiohttp  # noqa: PLC0415
    import uvloop  # noqa: PLC0415

    from ops.traffic import basic_auth  # noqa: PLC0415

    async def main() -> dict[str, Any]:
        headers = {"Authorization": basic_auth("bench-key"), "Content-Type": "application/json"}
        latencies: list[float] = []
        failures = 0
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker(n: int, until: float, record: bool) -> None:
                nonlocal failures
                i = n
                while time.perf_counter() < until:
                    started = time.perf_counter()
                    async with session.post(
                        url + path, data=bodies[i % len(bodies)], headers=headers
                    ) as resp:
                        await resp.read()
                        if record:
                            if resp.status == 200:
                                latencies.append(time.perf_counter() - started)
                            else:
                                failures += 1
                    i += connections

            warm = time.perf_counter() + 2.0
            await asyncio.gather(*(worker(n, warm, False) for n in range(connections)))
            started = time.perf_counter()
            await asyncio.gather(*(worker(n, started + seconds, True) for n in range(connections)))
            elapsed = time.perf_counter() - started
        latencies.sort()
        return {
            "requests_per_s": len(latencies) / elapsed,
            "events_per_s": len(latencies) * events_per_body / elapsed,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
            "failures": failures,
        }

    out.put(uvloop.run(main()))


def _run_load(
    url: str, path: str, bodies: list[bytes], per_body: int, connections: int, seconds: float
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_load, args=(url, path, bodies, per_body, connections, seconds, queue)
    )
    proc.start()
    result: dict[str, Any] = queue.get(timeout=seconds + 120)
    proc.join()
    return result


@bench_app.command("gateway")
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
    from ops.services import Service  # noqa: PLC0415
    from ops.traffic import sample_events  # noqa: PLC0415

    kafka, _ = _topics(bootstrap or KafkaSettings().bootstrap_servers)
    ingest = Topics(kafka.topic_prefix).ingest
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "connections": connections,
        "batch_size": batch_size,
    }
    with console.status(f"baseline: raw confluent-kafka producer, {baseline_events:,} events ..."):
        results["producer_events_per_s"] = raw_producer_rate(
            kafka, ingest, _envelopes(baseline_events)
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    config = workdir / "sluice.yaml"
    config.write_text(BENCH_CONFIG)
    service = Service("gateway", workdir)
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
            results["batched"] = _run_load(
                url, "/v1/batch", batches, batch_size, connections, seconds
            )
        with console.status(
            f"gateway: single events (/v1/track), {connections} connections, {seconds:.0f}s ..."
        ):
            results["single"] = _run_load(url, "/v1/track", singles, 1, connections, seconds)
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
    console.print(table)
    ratio = results["batched"]["events_per_s"] / results["producer_events_per_s"]
    console.print(f"batched gateway / raw producer: {ratio:.2f}")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    if results["batched"]["failures"] or results["single"]["failures"]:
        console.print("[red]some requests failed[/red]")
        raise typer.Exit(1)


@bench_app.command("sink")
def bench_sink(
    events: Annotated[int, typer.Option(help="Events to load.")] = 200_000,
    layout: Annotated[
        bool, typer.Option(help="Also fan out into the per-type and per-event tables.")
    ] = True,
    bootstrap: Bootstrap = None,
    json_out: JsonOut = None,
) -> None:
    """Warehouse sink rows/s (Kafka to embedded ClickHouse) next to a bare insert loop."""

    from connectors.clickhouse import COLUMN_NAMES, Warehouse, table_ddl  # noqa: PLC0415
    from connectors.sink import SinkTarget, WarehouseSink  # noqa: PLC0415
    from core.settings import WarehouseSettings  # noqa: PLC0415
    from core.topics import Topics  # noqa: PLC0415
    from schemas.codec import event_codec  # noqa: PLC0415

    kafka, _ = _topics(bootstrap or KafkaSettings().bootstrap_servers)
    topic = Topics(kafka.topic_prefix).destination("warehouse").main
    records = _envelopes(events)
    seed_topic(kafka, topic, records)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-wh-"))
    settings = WarehouseSettings(
        dsn=f"chdb://{workdir}", consumer_group=f"{kafka.topic_prefix}-sink"
    )
    warehouse = Warehouse(settings)
    results: dict[str, Any] = {"events": events, "layout": layout, "cores": os.cpu_count()}
    try:
        codec = event_codec(logical_types=False)
        decoded = [codec.decode(v) for _, v in records]
        for i, e in enumerate(decoded):
            e["_topic"], e["_partition"], e["_offset"] = topic, 0, i
        columns = [[e[name] for e in decoded] for name in COLUMN_NAMES]
        warehouse.command(
            table_ddl("bare", [(n, t) for n, t in _event_types()], "tuple()", replacing=False)
        )
        with console.status("baseline: bare clickhouse-connect inserts, 10,000 rows each ..."):
            started = time.perf_counter()
            for i in range(0, events, 10_000):
                warehouse.insert(
                    "bare", COLUMN_NAMES, [c[i : i + 10_000] for c in columns], f"bare-{i}"
                )
            results["bare_insert_rows_per_s"] = events / (time.perf_counter() - started)
        sink = WarehouseSink(
            warehouse, [SinkTarget("warehouse", topic, "events", layout)], kafka, settings, codec
        )
        with console.status(
            f"sink: Kafka -> decode -> {'layout + ' if layout else ''}insert -> commit ..."
        ):
            started = time.perf_counter()
            sink.start()
            while sink.metrics.rows.labels("warehouse")._value.get() < events:
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            sink.stop()
        rows = warehouse.query("SELECT count() FROM events").rows[0][0]
        if rows != events:
            console.print(f"[red]expected {events} rows, found {rows}[/red]")
            raise typer.Exit(1)
        # Every row the sink wrote: the events table and, with the layout, the per-type,
        # per-event and users tables (not the bookkeeping of loaded offset ranges).
        table_rows = warehouse.query(
            "SELECT sum(total_rows) FROM system.tables WHERE database = currentDatabase()"
            " AND name NOT IN ('bare', '_sluice_offsets')"
        ).rows[0][0]
        results["sink_events_per_s"] = events / elapsed
        results["sink_table_rows"] = int(table_rows)
        results["sink_rows_per_s"] = int(table_rows) / elapsed
    finally:
        warehouse.close()
        shutil.rmtree(workdir, ignore_errors=True)
    table = Table(
        title=f"Warehouse sink ({results['cores']} cores, embedded ClickHouse, broker on this machine)"
    )
    table.add_column("setup")
    table.add_column("events/s", justify="right")
    table.add_column("rows/s (all tables)", justify="right")
    bare = results["bare_insert_rows_per_s"]
    table.add_row(
        "bare clickhouse-connect insert loop, 10k rows/insert (baseline)",
        f"{bare:,.0f}",
        f"{bare:,.0f}",
    )
    label = (
        "sink: consume, decode, insert events" + (" + layout tables" if layout else "") + ", commit"
    )
    table.add_row(
        label, f"{results['sink_events_per_s']:,.0f}", f"{results['sink_rows_per_s']:,.0f}"
    )
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


def _event_types() -> list[tuple[str, str]]:
    from connectors.clickhouse import EVENT_COLUMNS  # noqa: PLC0415

    return list(EVENT_COLUMNS)


def _end_offsets(kafka: KafkaSettings, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

    consumer = Consumer(kafka.client_config() | {"group.id": "sluice-bench-watermarks"})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.topics[topic].partitions
        )
    finally:
        consumer.close()


def plain_loop_rate(
    kafka: KafkaSettings, source: str, config: str, count: int
) -> tuple[float, int]:
    """Events/s of a bare confluent-kafka loop doing the processor's work with its router,
    and how many records it wrote to the destination topic.

    Consume 1,000 at a time, route them (decode, filter, transform, encode) with the same
    `Router` the worker uses, produce, commit every second: the worker minus Faust. Its
    outputs go to topics of a prefix of their own.
    """
    from confluent_kafka import Consumer, Producer  # noqa: PLC0415

    from core.config import parse_config  # noqa: PLC0415
    from core.topics import Topics  # noqa: PLC0415
    from schemas.codec import event_codec  # noqa: PLC0415
    from streams.processor import Incoming, Router  # noqa: PLC0415

    router = Router(
        parse_config(config),
        Topics(f"{kafka.topic_prefix}-plain"),
        event_codec(logical_types=False),
        TransformSettings(modules=(BENCH_TRANSFORM_MODULES,)),
    )
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"bench-plain-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    producer = Producer(
        kafka.client_config()
        | {"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"}
    )
    consumer.subscribe([source])
    done = routed = 0
    started = 0.0
    last_commit = time.monotonic()
    while done < count:
        msgs = consumer.consume(1000, timeout=1.0)
        if msgs and not started:
            started = time.perf_counter()
        batch = [
            Incoming(m.key(), m.value() or b"", source, m.partition() or 0, m.offset() or 0, 0)
            for m in msgs
            if m.error() is None
        ]
        for topic, records in router.route(batch).outputs.items():
            producer.produce_batch(topic, [{"key": k, "value": v} for k, v, _ in records])
            if topic.endswith(".dest.warehouse"):
                routed += len(records)
        done += len(batch)
        producer.poll(0)
        if time.monotonic() - last_commit > 1.0:
            producer.flush()
            consumer.commit(asynchronous=False)
            last_commit = time.monotonic()
    producer.flush()
    elapsed = time.perf_counter() - started
    consumer.close()
    return count / elapsed, routed


@bench_app.command("processor")
def bench_processor(
    events: Annotated[int, typer.Option(help="Events to process.")] = 200_000,
    transform: Annotated[
        bool, typer.Option(help="Route through a filter and a user transform as well.")
    ] = False,
    bootstrap: Bootstrap = None,
    json_out: JsonOut = None,
) -> None:
    """Worker (Faust) events/s from ingest to destination topic, next to a plain confluent-kafka loop."""

    from core.topics import Topics  # noqa: PLC0415
    from ops.services import Service  # noqa: PLC0415

    kafka, _ = _topics(bootstrap or KafkaSettings().bootstrap_servers)
    topics = Topics(kafka.topic_prefix)
    dest = topics.destination("warehouse").main
    records = _envelopes(events)
    seed_topic(kafka, topics.ingest, records)
    results: dict[str, Any] = {"events": events, "cores": os.cpu_count(), "transform": transform}
    config_text = TRANSFORM_CONFIG if transform else BENCH_CONFIG
    with console.status("baseline: plain confluent-kafka consume -> route -> produce loop ..."):
        results["plain_loop_events_per_s"], expected = plain_loop_rate(
            kafka, topics.ingest, config_text, events
        )
    results["routed"] = expected
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-worker-"))
    config = workdir / "sluice.yaml"
    config.write_text(config_text)
    service = Service("worker", workdir)
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("sluice worker", total=expected)
            service.start(
                ["worker"],
                {
                    "SLUICE_CONFIG_FILE": str(config),
                    "SLUICE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                    "SLUICE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
                    "SLUICE_WORKER_APP_ID": f"{kafka.topic_prefix}-worker",
                    "SLUICE_WORKER_DATA_DIR": str(workdir / "data"),
                    "SLUICE_TRANSFORM_MODULES": BENCH_TRANSFORM_MODULES,
                },
            )
            first = 0.0
            while True:
                done = _end_offsets(kafka, dest)
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
        "sluice worker (Faust agent, batched delivery + batch produce, uvloop)",
        f"{results['worker_events_per_s']:,.0f}",
    )
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
