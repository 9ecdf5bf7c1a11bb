"""The BullMQ baseline of `sluice bench jobs`: npm's bullmq (pinned in
`ops/benchmarks/bullmq/package-lock.json`, installed there with `npm ci`) on a redis-server
of `ops.baseline_services`, driven by `bullmq/bench.mjs`.

One worker process (a no-op processor, concurrency 100) and one producer process
(`addBulk`, 1,000 jobs a call, 4 calls in flight, `removeOnComplete`); the rate is from the
producer's first submit to the worker's last completion, in wall-clock milliseconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ops.benchmarks.harness import percentile
from ops.errors import ProcessError

PACKAGE_DIR = Path(__file__).parent / "bullmq"
SCRIPT = PACKAGE_DIR / "bench.mjs"


def ensure_installed() -> None:
    """`npm ci` in `ops/benchmarks/bullmq` unless its lock file is installed already."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise ProcessError("the BullMQ baseline needs node and npm (Debian: apt-get install npm)")
    lock = PACKAGE_DIR / "package-lock.json"
    installed = PACKAGE_DIR / "node_modules" / ".package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],  # noqa: S607 - npm by name
        cwd=PACKAGE_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["?"]
        raise ProcessError(f"`npm ci` for the BullMQ baseline failed: {last[0]}")


class _Node:
    """`node bench.mjs <mode> …` with its JSON lines read from stdout."""

    def __init__(self, mode: str, port: int, queue: str, jobs: int, *extra: str) -> None:
        argv = ["node", str(SCRIPT), mode, "--port", str(port), "--queue", queue]
        argv += ["--jobs", str(jobs), *extra]
        self.mode = mode
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PACKAGE_DIR
        )

    def line(self, key: str) -> dict[str, Any]:
        """The next JSON line with `key` (a failure line is skipped; EOF is an error)."""
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        for text in out:
            found: dict[str, Any] = json.loads(text)
            if key in found:
                return found
        err = self.proc.stderr.read().strip().splitlines() if self.proc.stderr else []
        raise ProcessError(f"the BullMQ {self.mode} exited: {(err or ['?'])[-1]}")

    def close(self) -> None:
        """Wait for it to exit (it exits by itself once done); kill it after 10 s."""
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def throughput(
    port: int, jobs: int, on_progress: Callable[[str], None] | None = None
) -> dict[str, float]:
    """Jobs/s from the first `addBulk` to the last completion, one worker process."""
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    worker = _Node("worker", port, queue, jobs)
    producer: _Node | None = None
    try:
        worker.line("ready")
        if on_progress:
            on_progress("submitting and working")
        producer = _Node("produce", port, queue, jobs, "--batch", "1000", "--in-flight", "4")
        produced = producer.line("first_submit_ms")
        if on_progress:
            on_progress("submitted; working")
        done = worker.line("done")
    finally:
        for proc in (producer, worker):
            if proc is not None:
                proc.close()
    seconds = (done["last_completed_ms"] - produced["first_submit_ms"]) / 1000
    return {
        "jobs_per_s": jobs / seconds,
        "seconds": seconds,
        "submit_s": (produced["submitted_ms"] - produced["first_submit_ms"]) / 1000,
    }


def latency(port: int, samples: int) -> dict[str, float]:
    """Submit-to-start p50/p99 (ms) on an idle queue: one job at a time."""
    queue = f"bench-latency-{uuid.uuid4().hex[:8]}"
    worker = _Node("worker", port, queue, samples, "--latency")
    producer: _Node | None = None
    try:
        worker.line("ready")
        time.sleep(0.5)  # the worker's blocking wait for jobs is in place
        producer = _Node("latency", port, queue, samples)
        producer.line("submitted")
        waits = sorted(float(w) for w in worker.line("done")["waits_ms"])
    finally:
        for proc in (producer, worker):
            if proc is not None:
                proc.close()
    return {"p50_ms": percentile(waits, 0.5), "p99_ms": percentile(waits, 0.99)}
