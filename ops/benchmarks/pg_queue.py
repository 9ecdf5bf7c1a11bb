"""The PostgreSQL queue baseline of `sluice bench jobs`: a jobs table, `FOR UPDATE SKIP
LOCKED` claims, a delete as the ack, `synchronous_commit=on`.

A producer inserts the jobs (one transaction a batch) while one worker process claims
`claim` jobs a transaction, runs the no-op on each, deletes them and commits. Each runs
in a spawned process of its own; they report wall-clock times (`time.time()`), so the rate
is from the first submit to the last ack, as for Sluice and BullMQ.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable
from typing import Any

import orjson

TABLE = "bench_jobs"


def connect(dsn: str) -> Any:
    """A connection with `synchronous_commit=on`: a commit returns once its WAL is flushed."""
    import psycopg  # noqa: PLC0415

    conn = psycopg.connect(dsn)
    conn.execute("SET synchronous_commit = on")
    conn.commit()
    return conn


def reset(dsn: str) -> None:
    """An empty jobs table: `id bigserial` (the claim order) and a JSON payload."""
    with connect(dsn) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(
            f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, payload jsonb NOT NULL,"
            " submitted_at timestamptz NOT NULL DEFAULT now())"
        )


def submit(conn: Any, payloads: list[Any]) -> None:
    """Insert `payloads` as jobs in one transaction (COPY), committed before it returns."""
    with conn.cursor() as cur, cur.copy(f"COPY {TABLE} (payload) FROM STDIN") as copy:
        for payload in payloads:
            copy.write_row((orjson.dumps(payload).decode(),))
    conn.commit()


def claim_and_ack(conn: Any, limit: int) -> int:
    """Claim up to `limit` jobs, oldest first, run the no-op on each, delete them, commit.

    Returns how many jobs were done (0 when none was free).
    """
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT id, payload FROM {TABLE} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",  # noqa: S608
            (limit,),
        )
        rows = cur.fetchall()
        for _, payload in rows:
            _noop(payload)
        if rows:
            cur.execute(f"DELETE FROM {TABLE} WHERE id = ANY(%s)", ([r[0] for r in rows],))  # noqa: S608
    conn.commit()
    return len(rows)


def _noop(payload: Any) -> None:
    """The job."""


def _work(dsn: str, count: int, claim: int, out: Any, progress: Any) -> None:
    """The worker process: claims until `count` jobs are done; reports the last ack's time."""
    conn = connect(dsn)
    out.put("ready")
    done = 0
    while done < count:
        got = claim_and_ack(conn, claim)
        if not got:
            time.sleep(0.001)
        done += got
        progress.value = done
    out.put({"done": done, "last_ack": time.time()})
    conn.close()


def _produce(dsn: str, count: int, batch: int, out: Any) -> None:
    """The producer process: `count` jobs in transactions of `batch`; reports the first submit."""
    conn = connect(dsn)
    payloads = [{"n": i} for i in range(count)]
    first = time.time()
    for start in range(0, count, batch):
        submit(conn, payloads[start : start + batch])
    out.put({"first_submit": first, "submitted": time.time()})
    conn.close()


def _answer(out: Any, proc: Any, name: str, waiting: Callable[[], object] = lambda: None) -> Any:
    """What `proc` puts on `out` next, calling `waiting` every 0.2 s until then."""
    while True:
        try:
            return out.get(timeout=0.2)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the postgres {name} exited ({proc.exitcode})") from None
            waiting()


def run(
    dsn: str,
    count: int,
    claim: int,
    batch: int = 1000,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Jobs/s from the first submit to the last ack, one worker claiming `claim` at a time.

    `on_progress(done)` is called about every 0.2 s while the worker runs.
    """
    reset(dsn)
    ctx = multiprocessing.get_context("spawn")
    worker_out, producer_out = ctx.Queue(), ctx.Queue()
    done = ctx.Value("q", 0, lock=False)
    worker = ctx.Process(target=_work, args=(dsn, count, claim, worker_out, done), daemon=True)
    producer = ctx.Process(target=_produce, args=(dsn, count, batch, producer_out), daemon=True)
    worker.start()
    try:
        _answer(worker_out, worker, "worker")
        producer.start()
        worked = _answer(
            worker_out, worker, "worker", lambda: on_progress and on_progress(done.value)
        )
        produced = _answer(producer_out, producer, "producer")
    finally:
        for proc in (producer, worker):
            if proc.pid is None:
                continue
            if proc.is_alive():
                proc.terminate()
            proc.join(10)
    elapsed = worked["last_ack"] - produced["first_submit"]
    return {
        "jobs_per_s": count / elapsed,
        "seconds": elapsed,
        "submit_s": produced["submitted"] - produced["first_submit"],
    }
