"""Hostile input through the whole pipeline: one run, every kind of bad input at once.

Gateway, worker, sink and delivery run as real processes on the real broker and engine.
Each hostile input ends where the hardening rules say (a 4xx with its reason, or a DLQ
record with its reason), every other event of the run lands exactly once, and afterwards
every service is still ready and still processing.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from connectors.warehouse.layout import event_table
from core.config import parse_config
from core.config_topic import apply_config
from core.settings import KafkaSettings
from core.topics import Topics
from ops.traffic import basic_auth
from schemas.codec import event_codec
from tests.configs import KEY, Configs
from tests.pipeline import (
    Pipeline,
    envelope_records,
    free_port,
    http_json,
    pipeline_with_topics,
    produce,
    read_records,
    until,
    webhook_receiver,
)

pytestmark = pytest.mark.integration


def _config(hook_port: int, keys: tuple[str, ...] = (KEY,)) -> str:
    configs = Configs()
    # Outputs that grow past Kafka's message size: the worker's own refusals.
    fat = configs.warehouse(
        "fat",
        filter={"allow_events": ["Inflate Me", "Order Completed"]},
        transform={"function": "tests.transforms:inflate"},
        settings={"table": "fat_events", "layout": False},
    )
    hook = configs.webhook(
        f"http://127.0.0.1:{hook_port}/hook",
        filter={"allow_events": ["Hook Me"]},
        retry={"tiers": ["1s", "2s"], "max_attempts": 6, "max_retry_after_s": 2},
        # Every first try fails: with the default breaker (open after 5 in a row for 30 s,
        # reopened by a failed probe) the retries' timing would be the breaker's, not the
        # capped Retry-After this test is about.
        breaker={"failures": 1000, "cooldown_s": 1},
    )
    return configs.text(configs.warehouse(), fat, hook, sources=[configs.source(keys=keys)])


# Retry-After values a hostile (or broken) webhook answers with.
RETRY_AFTERS = ("inf", "-5", "nan", "99999999999", "Wed, 21 Oct 9999 07:28:00 GMT", "soon")
# Numbers and times no later stage can hold: each message is refused with a reason.
UNHOLDABLE = (
    {"properties": {"n": "__1e999__"}},
    {"properties": {"n": 123456789012345678901234567890}},
    {"properties": {"n": 2**63 + 5}},
    {"properties": {"n": -(2**70)}},
    {"timestamp": "0001-01-01T00:00:00Z"},
    {"timestamp": "9999-12-31T23:59:59Z"},
    {"timestamp": "2026-01-01T00:00:00Z", "sentAt": "1800-01-01T00:00:00Z"},
)
# Names that must each get a distinct table, and names of tables no event may write into.
NAMES = ("Заказ оформлен", "Заказ отменён", "注文完了", "注文取消", "events", "_sluice_offsets")
# More event names than the source may make tables for.
MAX_TABLES = 10
MANY = tuple(f"Many {i}" for i in range(MAX_TABLES + 5))


def _track(event: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": event,
        "userId": f"u-{uuid.uuid4().hex[:6]}",
        "messageId": str(uuid.uuid4()),
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "properties": {"price": 1.5},
        **extra,
    }


def _body(messages: list[dict[str, Any]]) -> bytes:
    # 1e999 cannot be written by a JSON encoder: put the literal text in place.
    # and orjson refuses integers past 64 bits: the standard library writes them.
    return json.dumps({"batch": messages}).replace('"__1e999__"', "1e999").encode()


def _array(values: list[str]) -> str:
    return "[" + ",".join("'" + v.replace("'", "") + "'" for v in values) + "]"


def _tables(pipe: Pipeline) -> set[str]:
    return {str(r[0]) for r in pipe.query("SHOW TABLES")}


def _ready(url: str) -> int:
    try:
        http_json(url, timeout=5)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0
    return 200


async def test_hostile_inputs_end_in_a_reason_and_everything_else_lands_once(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    hook_port = free_port()
    pipe = pipeline_with_topics(tmp_path, broker, prefix, config=_config(hook_port))
    # Order Completed, the names, then room for MAX_TABLES of the many.
    pipe.env["SLUICE_WAREHOUSE_MAX_EVENT_TABLES"] = str(1 + len(NAMES) + MAX_TABLES)
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    topics = Topics(prefix)

    hook_seen: Counter[str] = Counter()

    async def hook(request: web.Request) -> web.Response:
        event = await request.json()
        event_id = str(event.get("messageId") or event.get("event_id"))
        hook_seen[event_id] += 1
        if hook_seen[event_id] == 1:
            retry_after = RETRY_AFTERS[int(event["properties"]["n"]) % len(RETRY_AFTERS)]
            return web.Response(status=429, headers={"Retry-After": retry_after})
        return web.Response(status=200)

    async with webhook_receiver(hook_port, hook):
        await asyncio.to_thread(pipe.start)
        good: list[dict[str, Any]] = []
        async with aiohttp.ClientSession(
            headers={"Authorization": basic_auth(pipe.write_key)}
        ) as http:

            async def post(messages: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
                async with http.post(
                    f"{pipe.gateway_url}/v1/batch",
                    data=_body(messages),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    return resp.status, await resp.json()

            # 1. Unholdable numbers and times among good events: those refused with a reason.
            batch = [_track("Order Completed") for _ in range(20)]
            hostile = [_track("Order Completed", **case) for case in UNHOLDABLE]
            status, answer = await post(batch + hostile)
            assert status == 200, answer
            assert answer["accepted"] == len(batch)
            refused = {r["index"]: r["reason"] for r in answer["rejected"]}
            assert sorted(refused) == list(range(len(batch), len(batch) + len(UNHOLDABLE)))
            assert all(reason for reason in refused.values())
            good += batch
            status, answer = await post(hostile[:1])
            assert status == 400, answer

            # 2. Names: non-ASCII and reserved ones first (each must get a table of its own),
            # then more distinct names than the source may make tables for.
            named = [_track(name) for name in NAMES]
            status, answer = await post(named)
            assert (status, answer["accepted"]) == (200, len(named)), answer
            await until(
                lambda: all(event_table(n) in _tables(pipe) for n in (*NAMES, "Order Completed")),
                120,
                "a table for every distinct name",
            )
            many = [_track(name) for name in MANY]
            status, answer = await post(many)
            assert (status, answer["accepted"]) == (200, len(many)), answer
            good += named + many

            # 3. An output the worker cannot write (2 MB after its transform).
            fat = _track("Inflate Me", properties={"inflate": True})
            status, _ = await post([fat])
            assert status == 200
            good.append(fat)

            # 4. A webhook answering each first try with a hostile Retry-After.
            hooked = [_track("Hook Me", properties={"n": i}) for i in range(2 * len(RETRY_AFTERS))]
            status, _ = await post(hooked)
            assert status == 200
            good += hooked

        # 5. Records the warehouse refuses for good, from a producer other than Sluice's
        # worker (properties that are not JSON).
        bad = _track("Order Completed")
        ((key, value, _),) = envelope_records([bad])
        record = event_codec(logical_types=False).decode(value)
        record["properties"] = "{not json"
        produce(
            kafka,
            topics.destination("warehouse").main,
            [(key, event_codec(logical_types=False).encode(record), None)],
        )

        # 6. A config record nobody should have written, then a valid config: the bad one
        # is refused, the later one applies (a new write key works).
        produce(kafka, topics.config, [(b"pipeline", b'{"sources": "nonsense"}', None)])
        new_key = "hostile-new-key"
        cfg = parse_config(_config(hook_port, keys=(pipe.write_key, new_key)))
        await asyncio.to_thread(apply_config, cfg, kafka)

        async def new_key_works() -> bool:
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    f"{pipe.gateway_url}/v1/track",
                    json=_track("Order Completed"),
                    headers={"Authorization": basic_auth(new_key)},
                ) as resp,
            ):
                return resp.status == 200

        deadline = asyncio.get_running_loop().time() + 30
        while not await new_key_works():
            assert asyncio.get_running_loop().time() < deadline, "the later config never applied"
            await asyncio.sleep(0.5)

        ids = sorted(m["messageId"] for m in good)
        wanted = "SELECT count(), uniqExact(event_id) FROM events WHERE has({ids:Array(String)}, event_id)"

        def landed() -> list[Any]:
            return pipe.query(wanted.replace("{ids:Array(String)}", _array(ids)))[0]

        # Every good event once in the raw table.
        await until(lambda: landed()[1] == len(ids), 120, "every good event in the warehouse")
        await asyncio.sleep(2)  # copies arriving late would show now
        assert landed() == [len(ids), len(ids)]
        assert pipe.query(f"SELECT count() FROM events WHERE event_id = '{bad['messageId']}'") == [
            [0]
        ]

        # Each hostile Retry-After capped: every hooked event delivered, none dead-lettered.
        await until(
            lambda: all(hook_seen[m["messageId"]] >= 2 for m in hooked),
            within=90,
            what="every hooked event delivered after its hostile Retry-After",
        )
        assert read_records(kafka, topics.destination("hook").dlq) == []

        # The 2 MB output and the refused insert are in their DLQs with their reasons.
        def dlq_reasons(dest: str) -> dict[str, tuple[str, str]]:
            codec = event_codec(logical_types=False)
            found = {}
            for msg in read_records(kafka, topics.destination(dest).dlq):
                headers = {k: (v or b"").decode() for k, v in msg.headers() or []}
                found[codec.decode(msg.value())["event_id"]] = (
                    headers.get("sluice.error.class", ""),
                    headers.get("sluice.error.message", ""),
                )
            return found

        await until(
            lambda: fat["messageId"] in dlq_reasons("fat"), 60, "the 2 MB output in its DLQ"
        )
        error_class, message = dlq_reasons("fat")[fat["messageId"]]
        assert error_class == "RecordRefused"
        assert message
        await until(
            lambda: bad["messageId"] in dlq_reasons("warehouse"), 60, "the refused row in its DLQ"
        )
        assert dlq_reasons("warehouse")[bad["messageId"]][1]

        # Names: a distinct table for each distinct name, none written into a reserved one.
        for name in NAMES:
            table = event_table(name)
            assert pipe.query(f"SELECT count() FROM `{table}`") == [[1]], (name, table)
        assert len({event_table(name) for name in NAMES}) == len(NAMES)
        offsets_columns = {r[0] for r in pipe.query("DESCRIBE TABLE _sluice_offsets")}
        assert offsets_columns == {"topic", "partition", "first", "last", "loaded_at"}
        # Past the source's table limit: the events in tracks, the overflow in discards.
        tables = _tables(pipe)
        made = [m for m in many if event_table(m["event"]) in tables]
        # Events sent later (on other partitions) may have taken some of the room.
        later = [n for n in ("Inflate Me", "Hook Me") if event_table(n) in tables]
        assert len(made) + len(later) == MAX_TABLES
        many_ids = _array([m["messageId"] for m in many])
        assert pipe.query(f"SELECT count() FROM tracks WHERE has({many_ids}, id)") == [[len(many)]]
        overflow = pipe.query(
            f"SELECT uniqExact(row_id) FROM discards WHERE has({many_ids}, row_id) "
            "AND reason LIKE '%MAX_EVENT_TABLES%'"
        )
        assert overflow == [[len(many) - len(made)]]

        # Every service still ready, and still processing: one more event lands.
        for url in (
            f"{pipe.gateway_url}/ready",
            f"http://127.0.0.1:{pipe.query_port}/ready",
            f"http://127.0.0.1:{pipe.delivery_port}/ready",
            f"http://127.0.0.1:{pipe.worker_metrics_port}/ready",
        ):
            assert await asyncio.to_thread(_ready, url) == 200, url
        last = _track("Order Completed")
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{pipe.gateway_url}/v1/track",
                json=last,
                headers={"Authorization": basic_auth(pipe.write_key)},
            ) as resp,
        ):
            assert resp.status == 200
        await until(
            lambda: (
                pipe.query(f"SELECT count() FROM events WHERE event_id = '{last['messageId']}'")[0][
                    0
                ]
                == 1
            ),
            within=60,
            what="an event sent after all of it lands",
        )
