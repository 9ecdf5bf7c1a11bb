"""Jobs leased over HTTP: expiry gives a job to the next worker, stale leases get 409,
extended leases are never given out twice, nacks retry or kill, bad requests get 4xx."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from confluent_kafka import Producer

from core.jobs import LEASE_CALL
from tests.configs import Configs
from tests.jobs_api import BEARER, queue_pipeline, status_of, submit
from tests.pipeline import Pipeline, http_text, probe, until

pytestmark = pytest.mark.integration

LEASED = {"type": "lease", "max_visibility_s": 120}


def _url(pipe: Pipeline, path: str) -> str:
    return f"http://127.0.0.1:{pipe.job_ports['jobs']}{path}"


async def _post(
    session: aiohttp.ClientSession,
    pipe: Pipeline,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with session.post(
        _url(pipe, path), json=body, headers=BEARER if headers is None else headers
    ) as resp:
        return resp.status, await resp.json()


async def _lease(
    session: aiohttp.ClientSession, pipe: Pipeline, **body: Any
) -> list[dict[str, Any]]:
    status, answer = await _post(session, pipe, "/v1/queues/work/lease", body)
    assert status == 200, answer
    jobs: list[dict[str, Any]] = answer["jobs"]
    return jobs


async def test_an_expired_lease_goes_to_the_next_worker_and_the_late_ack_gets_409(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, executor=LEASED, priorities=1)
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            (job_id,) = await submit(session, pipe, [{"payload": {"n": 1}}])
            (first,) = await _lease(session, pipe, visibility_ms=1000, wait_ms=10_000)
            assert (first["id"], first["attempt"], first["payload"]) == (job_id, 1, {"n": 1})
            # The first worker stalls past its lease: the next one gets the job.
            (second,) = await _lease(session, pipe, visibility_ms=30_000, wait_ms=10_000)
            assert second["id"] == job_id
            assert second["attempt"] == 2
            assert second["lease_id"] != first["lease_id"]
            late = {"lease_id": first["lease_id"], "result": "late"}
            status, body = await _post(session, pipe, f"/v1/jobs/{job_id}/ack", late)
            assert status == 409, body
            status, body = await _post(
                session, pipe, f"/v1/jobs/{job_id}/nack", {"lease_id": first["lease_id"]}
            )
            assert status == 409, body
            done = {"lease_id": second["lease_id"], "result": {"ok": True}}
            status, body = await _post(session, pipe, f"/v1/jobs/{job_id}/ack", done)
            assert status == 200, body
            assert (body["state"], body["result"], body["attempt"]) == (
                "COMPLETED",
                {"ok": True},
                2,
            )
            # The same ack again (its answer was lost, say) is taken once.
            status, again = await _post(session, pipe, f"/v1/jobs/{job_id}/ack", done)
            assert (status, again["state"]) == (200, "COMPLETED")
            status, body = await _post(
                session, pipe, f"/v1/jobs/{job_id}/extend", {"lease_id": second["lease_id"]}
            )
            assert status == 409, body
        await until(lambda: (status_of(pipe, job_id) or {}).get("state") == "COMPLETED", 20)
        final = status_of(pipe, job_id)
        assert final is not None
        notes = [h.get("note") for h in final["history"] if h["state"] == "FAILED"]
        assert notes == ["lease expired"], final["history"]
        assert [h["state"] for h in final["history"]].count("COMPLETED") == 1
        metrics = await asyncio.to_thread(http_text, _url(pipe, "/metrics"))
        for name in ("leased", "acked", "lease_expiries"):
            assert f'sluice_jobs_{name}_total{{queue="work"}}' in metrics, name
    finally:
        await asyncio.to_thread(pipe.stop)


async def test_a_job_extending_its_lease_for_60_s_is_never_given_out_twice(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, executor=LEASED, priorities=1)
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            (job_id,) = await submit(session, pipe, [{"payload": "long"}])
            (held,) = await _lease(session, pipe, visibility_ms=2000, wait_ms=10_000)
            assert held["id"] == job_id
            others: list[dict[str, Any]] = []
            stop = asyncio.Event()

            async def another_worker() -> None:
                while not stop.is_set():
                    others.extend(await _lease(session, pipe, visibility_ms=2000, wait_ms=1000))

            poller = asyncio.create_task(another_worker())
            started = time.monotonic()
            while time.monotonic() - started < 60:
                await asyncio.sleep(1)
                status, body = await _post(
                    session,
                    pipe,
                    f"/v1/jobs/{job_id}/extend",
                    {"lease_id": held["lease_id"], "visibility_ms": 2000, "progress": {"at": 1}},
                )
                assert status == 200, body
                assert body["lease_until_ms"] > time.time() * 1000
            stop.set()
            await poller
            assert others == [], "the job was given out while its lease was extended"
            status, body = await _post(
                session, pipe, f"/v1/jobs/{job_id}/ack", {"lease_id": held["lease_id"]}
            )
            assert (status, body["state"], body["attempt"]) == (200, "COMPLETED", 1), body
            assert body["progress"] == {"at": 1}
            assert [h["state"] for h in body["history"]].count("ACTIVE") == 1
    finally:
        await asyncio.to_thread(pipe.stop)


async def test_nacks_retry_or_kill_and_bad_requests_get_4xx(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = queue_pipeline(
        configs, broker, prefix, tmp_path, executor=LEASED, priorities=1, max_attempts=3
    )
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            # Bad requests, before any job is there: a clear 4xx each.
            lease_path = "/v1/queues/work/lease"
            assert (await _post(session, pipe, lease_path, {}, headers={}))[0] == 401
            wrong = {"Authorization": "Bearer nope"}
            assert (await _post(session, pipe, lease_path, {}, headers=wrong))[0] == 401
            assert (await _post(session, pipe, "/v1/queues/other/lease", {}))[0] == 404
            for bad in ({"max_jobs": 0}, {"max_jobs": 101}, {"visibility_ms": 10**9}):
                status, body = await _post(session, pipe, lease_path, bad)
                assert status == 400, (bad, body)
            async with session.post(
                _url(pipe, lease_path), data=b"{not json", headers=BEARER
            ) as resp:
                assert resp.status == 400
            status, _ = await _post(session, pipe, "/v1/jobs/nope/ack", {"lease_id": "x"})
            assert status == 404

            ids = await submit(session, pipe, [{"payload": i} for i in range(2)])
            leased = await _lease(session, pipe, max_jobs=2, visibility_ms=30_000, wait_ms=5000)
            while len(leased) < 2:
                leased += await _lease(session, pipe, visibility_ms=30_000, wait_ms=5000)
            by_payload = {job["payload"]: job for job in leased}
            retried, killed = by_payload[0], by_payload[1]
            status, body = await _post(session, pipe, f"/v1/jobs/{retried['id']}/ack", {})
            assert status == 400, body  # no lease id
            # A result or progress report too big for a status record: 413, the lease holds.
            lease = {"lease_id": retried["lease_id"]}
            big = {**lease, "result": "x" * 70_000}
            status, body = await _post(session, pipe, f"/v1/jobs/{retried['id']}/ack", big)
            assert status == 413, body
            big = {**lease, "progress": "x" * 5000}
            status, body = await _post(session, pipe, f"/v1/jobs/{retried['id']}/extend", big)
            assert status == 413, body
            status, body = await _post(
                session,
                pipe,
                f"/v1/jobs/{retried['id']}/nack",
                {"lease_id": retried["lease_id"], "error": "try again"},
            )
            assert (status, body["state"], body["error"]) == (200, "FAILED", "Nacked: try again")
            status, body = await _post(
                session,
                pipe,
                f"/v1/jobs/{killed['id']}/nack",
                {"lease_id": killed["lease_id"], "error": "never", "fatal": True},
            )
            assert (status, body["state"]) == (200, "DEAD"), body
            # The nacked job comes back after its backoff, as attempt 2.
            (again,) = await _lease(session, pipe, visibility_ms=30_000, wait_ms=10_000)
            assert (again["id"], again["attempt"]) == (retried["id"], 2)
            status, body = await _post(
                session, pipe, f"/v1/jobs/{again['id']}/ack", {"lease_id": again["lease_id"]}
            )
            assert (status, body["state"]) == (200, "COMPLETED")
            # The dead one is in the DLQ and is not leased again.
            assert await _lease(session, pipe, wait_ms=1500) == []
        assert set(ids) == {retried["id"], killed["id"]}
    finally:
        await asyncio.to_thread(pipe.stop)


async def test_lease_calls_to_another_job_worker_process_reach_the_one_holding_the_lease(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = queue_pipeline(configs, broker, prefix, tmp_path, executor=LEASED, priorities=1)
    await asyncio.to_thread(pipe.start, "gateway", "jobs", "jobs2")
    other = {"jobs": "jobs2", "jobs2": "jobs"}
    try:
        async with aiohttp.ClientSession() as session:

            async def lease_from(name: str) -> dict[str, Any]:
                async with session.post(
                    f"http://127.0.0.1:{pipe.job_ports[name]}/v1/queues/work/lease",
                    json={"visibility_ms": 20_000, "wait_ms": 3000},
                    headers=BEARER,
                ) as resp:
                    assert resp.status == 200
                    jobs: list[dict[str, Any]] = (await resp.json())["jobs"]
                    assert len(jobs) <= 1
                    return jobs[0] if jobs else {}

            async def call(name: str, job_id: str, op: str, body: Any) -> tuple[int, Any]:
                async with session.post(
                    f"http://127.0.0.1:{pipe.job_ports[name]}/v1/jobs/{job_id}/{op}",
                    json=body,
                    headers=BEARER,
                ) as resp:
                    return resp.status, await resp.json()

            # Both in the group before any lease: a lease given before a rebalance stays
            # with its process while the job's partition moves on (see the README).
            await until(
                lambda: all(probe(pipe.job_ports[n])[0] == 200 for n in ("jobs", "jobs2")), 30
            )
            await asyncio.sleep(3)
            # Jobs on both partitions: each process has some to give out.
            await submit(session, pipe, [{"payload": i} for i in range(8)])
            held: list[tuple[str, dict[str, Any]]] = []
            while len(held) < 3:
                for name in ("jobs", "jobs2"):
                    job = await lease_from(name)
                    if job:
                        held.append((name, job))
            (name_a, a), (name_b, b), (name_c, c) = held[:3]
            # Each call goes to the process that did not give the lease.
            status, body = await call(
                other[name_a],
                a["id"],
                "extend",
                {"lease_id": a["lease_id"], "visibility_ms": 30_000, "progress": 7},
            )
            assert (status, body.get("progress")) == (200, 7), body
            assert body["lease_until_ms"] > a["lease_until_ms"]
            status, body = await call(
                other[name_a], a["id"], "ack", {"lease_id": a["lease_id"], "result": "fine"}
            )
            assert (status, body["state"]) == (200, "COMPLETED"), body
            status, body = await call(
                other[name_b], b["id"], "nack", {"lease_id": b["lease_id"], "error": "later"}
            )
            assert status == 200, body
            assert any(h["state"] == "FAILED" and h["attempt"] == 1 for h in body["history"])
            # An old lease, sent to either process, is refused.
            for name in ("jobs", "jobs2"):
                status, body = await call(name, b["id"], "ack", {"lease_id": b["lease_id"]})
                assert status == 409, body
            status, body = await call(other[name_c], c["id"], "ack", {"lease_id": "not-the-lease"})
            assert status == 409, body
        final = status_of(pipe, a["id"])
        assert final is not None
        assert (final["state"], final["result"]) == ("COMPLETED", "fine")
    finally:
        await asyncio.to_thread(pipe.stop)


async def test_lease_calls_on_the_queue_topic_that_do_not_hold_are_dropped_and_the_queue_runs_on(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    """Any Kafka client that may write a queue's topics can put a lease call on them: one
    that the HTTP API would refuse changes nothing, and the loop goes on."""
    pipe = queue_pipeline(
        configs, broker, prefix, tmp_path, executor=LEASED, priorities=1, partitions=1
    )
    await asyncio.to_thread(pipe.start, "gateway", "jobs")
    try:
        async with aiohttp.ClientSession() as session:
            (job_id,) = await submit(session, pipe, [{"payload": {"n": 1}}])
            (leased,) = await _lease(session, pipe, visibility_ms=30_000, wait_ms=10_000)
            await until(lambda: status_of(pipe, job_id) is not None, 20, "the ACTIVE status")
            status = status_of(pipe, job_id)
            assert status is not None
            lease_id = leased["lease_id"]
            calls = [
                b"not json",
                orjson.dumps([1, 2]),
                orjson.dumps({"job_id": job_id, "op": "extend"}),  # no lease id
                orjson.dumps(
                    {"job_id": job_id, "lease_id": lease_id, "op": "extend", "visibility_ms": "x"}
                ),
                orjson.dumps(
                    {
                        "job_id": job_id,
                        "lease_id": lease_id,
                        "op": "extend",
                        "visibility_ms": 10**12,
                    }
                ),
                orjson.dumps(
                    {
                        "job_id": job_id,
                        "lease_id": lease_id,
                        "op": "extend",
                        "visibility_ms": 60_000,
                        "progress": "p" * 10_000,
                    }
                ),
                orjson.dumps(
                    {"job_id": job_id, "lease_id": lease_id, "op": "ack", "result": "r" * 70_000}
                ),
            ]
            producer = Producer({"bootstrap.servers": broker})
            for call in calls:
                producer.produce(
                    status["topic"],
                    key=job_id.encode(),
                    value=None,
                    partition=status["partition"],
                    headers=[(LEASE_CALL, call)],
                )
            assert producer.flush(10) == 0
            # A job submitted after the calls is read after them (one partition): once it
            # is leased, the calls were all read.
            (later_id,) = await submit(session, pipe, [{"payload": {"n": 2}}])
            (later,) = await _lease(session, pipe, visibility_ms=30_000, wait_ms=20_000)
            assert later["id"] == later_id
            now = status_of(pipe, job_id)
            assert now is not None
            assert (now["state"], now["lease_until_ms"]) == ("ACTIVE", leased["lease_until_ms"])
            assert now["progress"] is None
            for job, lease in ((job_id, lease_id), (later_id, later["lease_id"])):
                code, body = await _post(
                    session, pipe, f"/v1/jobs/{job}/ack", {"lease_id": lease, "result": job}
                )
                assert (code, body["state"], body["result"]) == (200, "COMPLETED", job), body
        code, ready = await asyncio.to_thread(probe, pipe.job_ports["jobs"])
        assert code == 200, ready
    finally:
        await asyncio.to_thread(pipe.stop)
