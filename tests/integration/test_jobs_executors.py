"""The command and http executors on the real broker: the C++ and Python example jobs run
under the JSON contract with progress, timeouts end a job's whole process group, limits
and output bounds fail a job and not the executor, payloads stay data, a cancel through
another gateway ends a running job, a killed executor's jobs run again exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from ops.processes import BackgroundProcess
from tests.configs import Configs
from tests.jobs_api import BEARER, all_in, queue_pipeline, status_of, submit
from tests.pipeline import (
    Pipeline,
    free_port,
    http_json,
    http_receiver,
    http_text,
    probe,
    until,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SIEVE = str(ROOT / "build" / "jobs" / "sieve")
WORDCOUNT = str(ROOT / "examples" / "jobs" / "wordcount.py")


def command_pipeline(
    configs: Configs, broker: str, prefix: str, root: Path, argv: list[str], **queue: Any
) -> Pipeline:
    limits = queue.pop("limits", {})
    executor = {"type": "command", "argv": argv, "limits": limits, **queue.pop("executor", {})}
    pipe = queue_pipeline(configs, broker, prefix, root, executor=executor, **queue)
    pipe.env["SLUICE_JOBS_COMMANDS"] = f"{ROOT / 'build' / 'jobs'},{ROOT / 'examples' / 'jobs'}"
    pipe.env["SLUICE_JOBS_WORK_DIR"] = str(root / "work")
    (root / "work").mkdir()
    return pipe


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _exists(path: Path) -> bool:
    return path.exists()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_the_cpp_example_completes_100_jobs_with_results_and_progress(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = command_pipeline(configs, broker, prefix, tmp_path, [SIEVE], concurrency=4)
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        limits = [10_000 + 997 * i for i in range(100)]
        async with aiohttp.ClientSession() as session:
            ids = await submit(session, pipe, [{"payload": {"limit": n}} for n in limits])
        await until(lambda: all_in(pipe, ids, {"COMPLETED"}), 90, "100 sieve jobs completed")
        for job_id, limit in zip(ids, limits, strict=True):
            status = status_of(pipe, job_id)
            assert status is not None
            result = status["result"]
            # The primes up to the limit, counted by the C++ program; checked here.
            sieve = bytearray([1]) * (limit + 1)
            sieve[0:2] = b"\x00\x00"
            for p in range(2, int(limit**0.5) + 1):
                if sieve[p]:
                    sieve[p * p :: p] = bytearray(len(range(p * p, limit + 1, p)))
            assert result == {"limit": limit, "primes": sum(sieve), "largest": sieve.rindex(1)}
            progress = status["progress"]
            assert progress is not None, status
            # The last report kept, though the job ended within the 0.5 s between writes.
            assert progress == {"fraction": 1.0, "percent": 100.0, "message": "counted"}
        # GET /v1/stats: the queue's depth, throughput, success rate and processing times.
        (stats,) = http_json(f"{pipe.gateway_url}/v1/stats", headers=BEARER)["queues"]
        assert stats["queue"] == "work"
        assert stats["depth"] == {"waiting": 0, "scheduled": 0, "running": 0, "dead": 0}
        assert stats["throughput_per_s"] == round(100 / stats["window_s"], 4)
        assert (stats["success_rate"], stats["failure_rate"]) == (1.0, 0.0)
        assert stats["processing_ms"]["p50"] is not None
        assert stats["processing_ms"]["p50"] <= stats["processing_ms"]["p99"]
        # Every working directory was removed.
        assert list((tmp_path / "work").iterdir()) == []
        metrics = http_text(f"http://127.0.0.1:{pipe.job_ports['jobs']}/metrics")
        assert 'sluice_jobs_completed_total{queue="work"} 100.0' in metrics
        assert 'sluice_jobs_processes{queue="work"} 0.0' in metrics
    finally:
        pipe.stop()


async def test_a_job_over_its_timeout_and_its_grandchild_are_gone_and_it_is_retried(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = command_pipeline(
        configs,
        broker,
        prefix,
        tmp_path,
        [SIEVE],
        max_attempts=2,
        backoff={"base_ms": 200, "max_ms": 200},
        executor={"grace_s": 1.0},
    )
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    pid_file = tmp_path / "grandchild.pid"
    try:
        async with aiohttp.ClientSession() as session:
            (job_id,) = await submit(
                session,
                pipe,
                [
                    {
                        "payload": {"sleep_s": 60, "pid_file": str(pid_file), "limit": 10},
                        "timeout_ms": 2000,
                    }
                ],
            )
        await until(pid_file.exists, 20, "the job started its child")
        started = time.monotonic()
        grandchild = int(pid_file.read_text())
        pid_file.unlink()
        await until(lambda: not _alive(grandchild), 2 + 2 + 1, "the grandchild ended")
        assert time.monotonic() - started <= 2 + 2
        await until(lambda: (status_of(pipe, job_id) or {}).get("state") == "DEAD", 30)
        status = status_of(pipe, job_id)
        assert status is not None
        history = [(h["state"], h["attempt"]) for h in status["history"]]
        assert history == [("ACTIVE", 1), ("FAILED", 1), ("ACTIVE", 2), ("DEAD", 2)]
        assert "timeout" in status["history"][1]["error"]
        assert "JobTimeout" in status["error"]
        # The second attempt's grandchild went too.
        assert not _alive(int(pid_file.read_text()))
        metrics = http_text(f"http://127.0.0.1:{pipe.job_ports['jobs']}/metrics")
        assert 'sluice_jobs_timed_out_total{queue="work"} 2.0' in metrics
    finally:
        pipe.stop()


async def test_payloads_reach_the_program_as_data_never_as_shell_or_options(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = command_pipeline(configs, broker, prefix, tmp_path, [WORDCOUNT])
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    target = tmp_path / "pwned"
    texts = [
        f"; touch {target}",
        f"$(touch {target})",
        f"`touch {target}`",
        f"--output={target}",
        f"-o {target} && touch {target} | touch {target}",
        f"\n touch {target} \x00 ' \" \\",
    ]
    try:
        async with aiohttp.ClientSession() as session:
            ids = await submit(session, pipe, [{"payload": {"text": t}} for t in texts])
        await until(lambda: all_in(pipe, ids, {"COMPLETED"}), 30, "every job completed")
        for job_id, text in zip(ids, texts, strict=True):
            status = status_of(pipe, job_id)
            assert status is not None
            # The text came back as it was sent: it was data all the way.
            assert status["result"]["text"] == text
            # In a working directory of its own, removed since.
            cwd = Path(status["result"]["cwd"])
            assert cwd.parent == tmp_path / "work"
            assert not _exists(cwd)
        assert not target.exists()
    finally:
        pipe.stop()


async def test_memory_limit_and_output_bounds_fail_the_job_and_the_executor_lives_on(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = command_pipeline(
        configs, broker, prefix, tmp_path, [SIEVE], limits={"memory_mb": 64}, max_attempts=2
    )
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        worker = pipe.pid("jobs")
        async with aiohttp.ClientSession() as session:
            (hungry,) = await submit(session, pipe, [{"payload": {"allocate_mb": 512}}])
            await until(lambda: all_in(pipe, [hungry], {"DEAD"}), 30, "the hungry job failed")
            rss_before = _rss_kb(worker)
            (loud,) = await submit(session, pipe, [{"payload": {"stdout_mb": 100}}])
            await until(lambda: all_in(pipe, [loud], {"DEAD"}), 60, "the loud job failed")
            rss_after = _rss_kb(worker)
            (fine,) = await submit(session, pipe, [{"payload": {"limit": 1000}}])
            await until(lambda: all_in(pipe, [fine], {"COMPLETED"}), 30, "a job ran after them")
        hungry_status = status_of(pipe, hungry)
        assert hungry_status is not None
        assert "out of memory: could not allocate 512 MiB" in hungry_status["error"]
        assert "memory limit 64 MiB" in hungry_status["error"]
        loud_status = status_of(pipe, loud)
        assert loud_status is not None
        assert "more than 1048576 bytes to stdout" in loud_status["error"]
        # 100 MB went through the executor, which kept at most its bound of it.
        assert rss_after - rss_before < 30 * 1024, (rss_before, rss_after)
        assert (status_of(pipe, fine) or {})["result"]["primes"] == 168
        assert probe(pipe.job_ports["jobs"])[0] == 200
    finally:
        pipe.stop()


async def test_a_running_job_cancelled_through_another_gateway_is_gone_within_2_s(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = command_pipeline(configs, broker, prefix, tmp_path, [SIEVE])
    second = free_port()
    pipe.services["gateway-2"] = BackgroundProcess("gateway-2", tmp_path / "run")
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    pipe.services["gateway-2"].start(["gateway"], {**pipe.env, "SLUICE_GATEWAY_PORT": str(second)})
    pid_file = tmp_path / "child.pid"
    try:
        await asyncio.to_thread(pipe._wait, f"http://127.0.0.1:{second}/ready", "gateway-2")
        async with aiohttp.ClientSession() as session:
            (job_id,) = await submit(
                session, pipe, [{"payload": {"sleep_s": 60, "pid_file": str(pid_file)}}]
            )
            await until(pid_file.exists, 20, "the job started")
            child = int(pid_file.read_text())
            asked = time.monotonic()
            async with session.delete(
                f"http://127.0.0.1:{second}/v1/jobs/{job_id}", headers=BEARER
            ) as resp:
                body = await resp.json()
            assert resp.status == 200, body
            assert body["state"] == "CANCELLED"
            await until(lambda: not _alive(child), 2, "the job's processes ended")
            assert time.monotonic() - asked <= 2
        await asyncio.sleep(2)  # a retry, were there one, would have started by now
        status = status_of(pipe, job_id)
        assert status is not None
        assert status["state"] == "CANCELLED"
        assert [h["state"] for h in status["history"]] == ["ACTIVE", "CANCELLED"]
        metrics = http_text(f"http://127.0.0.1:{pipe.job_ports['jobs']}/metrics")
        assert 'sluice_jobs_cancelled_total{queue="work"} 1.0' in metrics
    finally:
        pipe.stop()


async def test_an_executor_killed_with_ten_long_jobs_running_completes_each_once(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = command_pipeline(configs, broker, prefix, tmp_path, [WORDCOUNT], lease_s=3)
    ledger = tmp_path / "ledger.jsonl"
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            ids = await submit(
                session,
                pipe,
                [
                    {"payload": {"text": f"job {i}", "sleep_s": 4, "ledger": str(ledger)}}
                    for i in range(10)
                ],
            )
        await until(lambda: all_in(pipe, ids, {"ACTIVE"}), 20, "all ten running")
        os.kill(pipe.pid("jobs"), signal.SIGKILL)
        pipe.services["jobs"].stop(timeout=10)
        assert not ledger.exists()  # none had finished
        await asyncio.to_thread(pipe.start, "jobs2")
        await until(lambda: all_in(pipe, ids, {"COMPLETED"}), 60, "all ten completed")
        await asyncio.sleep(2)  # a second run, were there one, would show by now
        done = [orjson.loads(line) for line in ledger.read_bytes().splitlines()]
        assert sorted(d["id"] for d in done) == sorted(ids)
        for job_id in ids:
            status = status_of(pipe, job_id)
            assert status is not None
            notes = [h.get("note") for h in status["history"]]
            assert "lease expired" in notes, status["history"]
    finally:
        pipe.stop()


async def test_the_http_executor_posts_the_job_and_classifies_the_answer(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    seen: list[dict[str, Any]] = []

    async def endpoint(request: web.Request) -> web.StreamResponse:
        job = await request.json()
        seen.append(job | {"header_attempt": request.headers["X-Sluice-Attempt"]})
        payload = job["payload"]
        if payload.get("status_first") and job["attempt"] == 1:
            return web.Response(status=payload["status_first"], text="try again")
        if payload.get("status"):
            return web.Response(status=payload["status"], text="no such thing")
        return web.json_response({"doubled": payload["n"] * 2, "job": job["id"]})

    async with http_receiver(endpoint, ("/run",)) as port:
        executor = {"type": "http", "url": f"http://127.0.0.1:{port}/run"}
        pipe = queue_pipeline(configs, broker, prefix, tmp_path, executor=executor)
        await asyncio.to_thread(pipe.start, "gateway", "jobs")
        try:
            async with aiohttp.ClientSession() as session:
                ok, flaky, rejected = await submit(
                    session,
                    pipe,
                    [
                        {"payload": {"n": 21}},
                        {"payload": {"n": 1, "status_first": 503}},
                        {"payload": {"n": 1, "status": 404}},
                    ],
                )
            await until(lambda: all_in(pipe, [ok, flaky, rejected], {"COMPLETED", "DEAD"}), 30)
            assert (status_of(pipe, ok) or {})["result"] == {"doubled": 42, "job": ok}
            flaky_status = status_of(pipe, flaky) or {}
            assert flaky_status["state"] == "COMPLETED"
            assert [h["state"] for h in flaky_status["history"]] == [
                "ACTIVE",
                "FAILED",
                "ACTIVE",
                "COMPLETED",
            ]
            assert "HTTP 503" in flaky_status["history"][1]["error"]
            rejected_status = status_of(pipe, rejected) or {}
            assert rejected_status["state"] == "DEAD"
            assert rejected_status["attempt"] == 1
            assert "HTTP 404" in rejected_status["error"]
            first = next(j for j in seen if j["id"] == ok)
            assert first["queue"] == "work"
            assert first["header_attempt"] == "1"
            assert first["deadline_ms"] > time.time() * 1000
        finally:
            pipe.stop()
