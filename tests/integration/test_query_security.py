"""The warehouse query endpoint tried as a hostile client would, on a real sink process.

A token is needed, only JSON runs, the engine refuses writes (readonly=1), nothing reaches a
file, a URL or another server, results and time are bounded, and a slow query never holds
up loading. `sluice sql` finds the token the sink generated.
"""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner

from connectors.errors import QueryFailed
from connectors.warehouse.clickhouse import Warehouse
from connectors.warehouse.queries import query_settings
from core.settings import KafkaSettings, WarehouseSettings
from ops.cli import app
from ops.traffic import sample_events
from tests.pipeline import Pipeline, envelope_records, pipeline_with_topics, produce

pytestmark = pytest.mark.integration

LOADED = 200
TIMEOUT_S = 8


def _post(
    pipe: Pipeline,
    body: bytes,
    content_type: str | None = "application/json",
    token: str | None = "",
    method: str = "POST",
) -> tuple[int, dict[str, str], Any]:
    """Status, headers and decoded JSON of one request to the query endpoint."""
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if token is not None:
        headers["Authorization"] = f"Bearer {token or pipe.query_token}"
    req = urllib.request.Request(
        f"http://127.0.0.1:{pipe.query_port}/query", data=body, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            raw = exc.read()
        return exc.code, dict(exc.headers), json.loads(raw) if raw.startswith(b"{") else raw


def _sql(pipe: Pipeline, sql: str) -> tuple[int, Any]:
    status, _, body = _post(pipe, json.dumps({"sql": sql}).encode())
    return status, body


def _load(pipe: Pipeline, count: int, seed: int) -> None:
    """`count` routed events straight onto the destination topic."""
    kafka = KafkaSettings(bootstrap_servers=pipe.bootstrap, topic_prefix=pipe.prefix)
    produce(kafka, f"{pipe.prefix}.dest.warehouse", envelope_records(sample_events(count, seed)))


@pytest.fixture(scope="module")
def sink(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A sink process with tight query bounds and LOADED events in its warehouse."""
    pipe = pipeline_with_topics(
        tmp_path_factory.mktemp("query"), broker, f"t{uuid.uuid4().hex[:10]}"
    )
    pipe.env.update(
        {
            "SLUICE_WAREHOUSE_QUERY_TIMEOUT_S": str(TIMEOUT_S),
            "SLUICE_WAREHOUSE_QUERY_MAX_ROWS": "1000",
            "SLUICE_WAREHOUSE_QUERY_MAX_BYTES": str(1024 * 1024),
            "SLUICE_WAREHOUSE_QUERY_MAX_MEMORY_BYTES": str(256 * 1024 * 1024),
        }
    )
    _load(pipe, LOADED, seed=21)
    pipe.start("sink")
    try:
        assert pipe.wait_rows(LOADED) == LOADED
        yield pipe
    finally:
        pipe.stop()


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP port on 127.0.0.1 and what anyone who connected to it sent."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    seen.append(conn.recv(4096))
                except OSError:
                    seen.append(b"")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], seen
    stop.set()
    thread.join(5)
    server.close()


def _state(pipe: Pipeline) -> list[Any]:
    """What a write would change: the tables, the raw table's columns and its row count."""
    return [
        pipe.query("SHOW TABLES"),
        pipe.query(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
            "AND table = 'events' ORDER BY position"
        ),
        pipe.query("SELECT count() FROM events"),
    ]


def test_a_query_without_the_right_token_is_refused(sink: Pipeline) -> None:
    body = json.dumps({"sql": "SELECT count() FROM events"}).encode()
    for token in (None, "wrong", sink.query_token[:-1], f"{sink.query_token}x"):
        status, headers, answer = _post(sink, body, token=token)
        assert status == 401, token
        assert "token" in answer["error"]
        assert headers["WWW-Authenticate"].startswith("Bearer")
    for header in (f"Basic {sink.query_token}", sink.query_token, f"Token {sink.query_token}"):
        req = urllib.request.Request(
            f"http://127.0.0.1:{sink.query_port}/query",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": header},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 401
        refused.value.close()
    assert _post(sink, body)[0] == 200


def test_only_json_requests_run_and_nothing_invites_a_browser(sink: Pipeline) -> None:
    sql = b'{"sql": "SELECT count() FROM events"}'
    # What a cross-site form or fetch without a preflight can send, even with the token.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        status, headers, answer = _post(sink, sql, content_type=content_type)
        assert status == 415, content_type
        assert "application/json" in answer["error"]
        assert not any(h.lower().startswith("access-control-") for h in headers)
    status, headers, _ = _post(sink, b"", content_type=None, token=None, method="OPTIONS")
    assert status >= 400
    assert not any(h.lower().startswith("access-control-") for h in headers)
    status, headers, answer = _post(sink, sql)
    assert status == 200
    assert not any(h.lower().startswith("access-control-") for h in headers)
    assert answer == {"columns": ["count()"], "rows": [[LOADED]]}


def test_a_select_with_the_token_answers_its_rows(sink: Pipeline) -> None:
    status, answer = _sql(
        sink, "SELECT type, count() AS n FROM events GROUP BY type ORDER BY type -- a comment"
    )
    assert status == 200
    assert answer["columns"] == ["type", "n"]
    assert sum(n for _, n in answer["rows"]) == LOADED
    for statement in ("SHOW TABLES", "DESCRIBE events", "EXISTS events", "EXPLAIN SELECT 1"):
        assert _sql(sink, statement)[0] == 200, statement
    status, answer = _sql(sink, "SELECT number FROM numbers(3) UNION ALL SELECT 7 ORDER BY 1")
    assert (status, answer["rows"]) == (200, [[0], [1], [2], [7]])


@pytest.mark.parametrize(
    "source",
    [
        "file('{secret}', 'LineAsString')",
        "url('http://127.0.0.1:{port}/x', 'LineAsString')",
        "remote('127.0.0.1:{port}', system.one)",
        "remoteSecure('127.0.0.1:{port}', system.one)",
        "cluster('default', system.one)",
        "clusterAllReplicas('default', system.one)",
        "s3('http://127.0.0.1:{port}/bucket/x.csv', 'CSV', 'a String')",
        "hdfs('hdfs://127.0.0.1:{port}/x', 'LineAsString')",
        "mysql('127.0.0.1:{port}', 'd', 't', 'u', 'p')",
        "postgresql('127.0.0.1:{port}', 'd', 't', 'u', 'p')",
        "jdbc('jdbc:mysql://127.0.0.1:{port}/d', 'd', 't')",
        "odbc('DSN=x', 'd', 't')",
        "executable('cat {secret}', 'LineAsString', 'x String')",
        "input('x String')",
        "urlCluster('default', 'http://127.0.0.1:{port}/x', 'LineAsString')",
        "fileCluster('default', '{secret}', 'LineAsString')",
        "azureBlobStorage('http://127.0.0.1:{port}', 'c', 'x', 'LineAsString')",
        "mongodb('127.0.0.1:{port}', 'd', 'c', 'u', 'p', 'x String')",
        "redis('127.0.0.1:{port}', 'k', 'k String')",
        "sqlite('{secret}', 't')",
        "iceberg('http://127.0.0.1:{port}/bucket/x')",
        "deltaLake('http://127.0.0.1:{port}/bucket/x')",
        "filesystem('{folder}')",
        "python(os)",
        "dictionary('x')",
        "view(SELECT * FROM file('{secret}', 'LineAsString'))",
    ],
)
def test_table_functions_that_reach_outside_are_refused(
    sink: Pipeline, tmp_path: Path, listener: tuple[int, list[bytes]], source: str
) -> None:
    port, seen = listener
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-4711\n")
    source = source.format(secret=secret, port=port, folder=tmp_path)
    for sql in (
        f"SELECT * FROM {source}",
        f"SELECT count() FROM events AS e JOIN {source} AS f ON 1 = 1",
        f"DESCRIBE {source}",
        f"SELECT * FROM events WHERE event_id IN (SELECT * FROM {source})",
    ):
        status, answer = _sql(sink, sql)
        assert status == 403, (sql, answer)
        assert "does not run here" in answer["error"]
        assert "TOPSECRET" not in json.dumps(answer)
    time.sleep(0.3)
    assert seen == [], "the engine connected to the listener"


def test_functions_that_read_files_are_refused(sink: Pipeline, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-4711\n")
    for sql in (
        f"SELECT file('{secret}')",
        f"SELECT length(file('{secret}')) > 0",
        f"SELECT count() FROM events WHERE event_id = file('{secret}')",
        "SELECT hasColumnInTable('127.0.0.1:1', 'default', 'events', 'event_id')",
    ):
        status, answer = _sql(sink, sql)
        assert status == 403, (sql, answer)
        assert "TOPSECRET" not in json.dumps(answer)


def test_into_outfile_is_refused_and_writes_no_file(sink: Pipeline, tmp_path: Path) -> None:
    for i, sql in enumerate(
        (
            "SELECT * FROM events INTO OUTFILE '{out}'",
            "SELECT 1 INTO OUTFILE '{out}' TRUNCATE",
            "SELECT 1 INTO OUTFILE '{out}' COMPRESSION 'gzip'",
            "SELECT 1 INTO OUTFILE '{out}' FORMAT CSV",
            "SHOW TABLES INTO OUTFILE '{out}'",
            "EXPLAIN SELECT 1 INTO OUTFILE '{out}'",
            "DESCRIBE events INTO OUTFILE '{out}'",
        )
    ):
        out = tmp_path / f"out{i}.txt"
        status, answer = _sql(sink, sql.format(out=out))
        assert status == 403, (sql, answer)
        assert "INTO OUTFILE" in answer["error"]
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_writes_are_refused_and_change_nothing(sink: Pipeline, tmp_path: Path) -> None:
    before = _state(sink)
    infile = tmp_path / "rows.tsv"
    infile.write_text("x\n")
    for sql in (
        "INSERT INTO events (event_id) VALUES ('x')",
        "INSERT INTO events (event_id) SELECT 'y'",
        f"INSERT INTO events (event_id) FROM INFILE '{infile}' FORMAT TSV",
        "INSERT INTO FUNCTION file('{out}', 'CSV') SELECT 1",
        "CREATE TABLE intruder (a UInt8) ENGINE = Memory",
        "CREATE TEMPORARY TABLE intruder (a UInt8)",
        "CREATE VIEW intruder AS SELECT 1",
        "DROP TABLE events",
        "DROP TABLE IF EXISTS tracks",
        "TRUNCATE TABLE events",
        "ALTER TABLE events ADD COLUMN intruder UInt8",
        "ALTER TABLE events DELETE WHERE 1",
        "ALTER TABLE events UPDATE event_id = 'z' WHERE 1",
        "RENAME TABLE events TO gone",
        "OPTIMIZE TABLE events FINAL",
        "SYSTEM FLUSH LOGS",
        "SYSTEM STOP MERGES",
        "KILL QUERY WHERE 1",
        "SET readonly = 0",
        "USE system",
        "SELECT 1; DROP TABLE events",
        "SELECT 1; INSERT INTO events (event_id) VALUES ('x')",
        "SELECT * FROM events SETTINGS readonly = 0",
        "SELECT * FROM numbers(5000) SETTINGS max_result_rows = 0",
        "EXPLAIN INSERT INTO events (event_id) VALUES ('x')",
    ):
        status, answer = _sql(sink, sql.format(out=tmp_path / "out.csv"))
        assert status == 403, (sql, answer)
    assert _state(sink) == before
    assert not (tmp_path / "out.csv").exists()


def test_a_huge_result_is_refused_with_a_clear_error(sink: Pipeline) -> None:
    status, answer = _sql(sink, "SELECT number FROM numbers(1000000)")
    assert status == 422
    assert "Limit for result exceeded" in answer["error"]
    # A constant column the engine counts once but sends on every row.
    status, answer = _sql(sink, "SELECT repeat('x', 900000) FROM numbers(500)")
    assert status == 422
    assert "limit" in answer["error"].lower()
    assert _sql(sink, "SELECT number FROM numbers(1000)")[0] == 200


def test_a_slow_query_is_cut_off_while_loading_goes_on(sink: Pipeline) -> None:
    outcome: dict[str, Any] = {}

    def slow() -> None:
        started = time.time()
        outcome["status"], outcome["answer"] = _sql(
            sink, "SELECT count() FROM numbers(1000000000000) WHERE sipHash64(number) = 0"
        )
        outcome["started"], outcome["ended"] = started, time.time()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    _load(sink, 100, seed=22)
    thread.join(TIMEOUT_S + 30)
    assert outcome["status"] == 504, outcome
    assert "Timeout exceeded" in outcome["answer"]["error"]
    assert outcome["ended"] - outcome["started"] < TIMEOUT_S + 5
    assert sink.wait_rows(LOADED + 100) == LOADED + 100
    # Rows of the events sent after the query started were loaded while it ran.
    during = sink.query(
        "SELECT count() FROM events WHERE toUnixTimestamp64Milli(_loaded_at) "
        f"BETWEEN {int(outcome['started'] * 1000)} AND {int(outcome['ended'] * 1000)}"
    )[0][0]
    assert during > 0
    assert _sql(sink, "SELECT 1")[0] == 200


def test_sluice_sql_reads_the_token_the_sink_generated(broker: str, tmp_path: Path) -> None:
    pipe = pipeline_with_topics(tmp_path, broker, f"t{uuid.uuid4().hex[:10]}")
    token_file = tmp_path / "state" / "query-token"
    pipe.env["SLUICE_WAREHOUSE_QUERY_TOKEN"] = ""  # none configured: the sink makes one
    pipe.env["SLUICE_WAREHOUSE_QUERY_TOKEN_FILE"] = str(token_file)
    _load(pipe, 20, seed=23)
    pipe.start("sink")
    try:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        env = {
            "SLUICE_WAREHOUSE_DSN": pipe.env["SLUICE_WAREHOUSE_DSN"],
            "SLUICE_WAREHOUSE_QUERY_PORT": str(pipe.query_port),
            "SLUICE_WAREHOUSE_QUERY_TOKEN_FILE": str(token_file),
            "SLUICE_WAREHOUSE_QUERY_TOKEN": "",
        }
        runner = CliRunner()
        deadline = time.monotonic() + 60
        while True:
            result = runner.invoke(
                app, ["sql", "--json", "SELECT count() AS n FROM events"], env=env
            )
            if result.exit_code == 0 and json.loads(result.output) == {"n": 20}:
                break
            assert time.monotonic() < deadline, result.output
            time.sleep(0.5)
        refused = runner.invoke(
            app, ["sql", "SELECT 1"], env={**env, "SLUICE_WAREHOUSE_QUERY_TOKEN": "wrong"}
        )
        assert refused.exit_code == 1
        assert "missing or wrong token" in refused.output
        assert "SLUICE_WAREHOUSE_QUERY_TOKEN" in refused.output
        assert "Traceback" not in refused.output
        written = runner.invoke(app, ["sql", "DROP TABLE events"], env=env)
        assert written.exit_code == 1
        assert "run here, not DropQuery" in written.output
    finally:
        pipe.stop()
    assert token_file.read_text().strip() == token  # kept across the run, never rewritten


def test_the_engine_itself_refuses_writes_and_outside_reads(tmp_path: Path) -> None:
    """Below the syntax-tree check, the query client's readonly=1 is what refuses writes."""
    settings = WarehouseSettings(dsn=f"chdb://{tmp_path / 'wh'}", query_timeout_s=5)
    warehouse = Warehouse(settings)
    try:
        warehouse.ensure_table("events")
        secret = tmp_path / "secret.txt"
        secret.write_text("TOPSECRET\n")
        for sql in (
            "INSERT INTO events (event_id) VALUES ('x')",
            "CREATE TABLE intruder (a UInt8) ENGINE = Memory",
            "ALTER TABLE events ADD COLUMN intruder UInt8",
            "DROP TABLE events",
            "TRUNCATE TABLE events",
            "SYSTEM FLUSH LOGS",
            "SET max_execution_time = 0",
            "SELECT 1 SETTINGS max_result_rows = 0",
            f"SELECT * FROM file('{secret}', 'LineAsString')",
            "SELECT * FROM url('http://127.0.0.1:1/x', 'LineAsString')",
            "SELECT * FROM remote('127.0.0.1:1', system.one)",
            "SELECT * FROM s3('http://127.0.0.1:1/bucket/x.csv', 'CSV', 'a String')",
            "SELECT * FROM mysql('127.0.0.1:1', 'd', 't', 'u', 'p')",
            f"SELECT * FROM executable('cat {secret}', 'LineAsString', 'x String')",
        ):
            with pytest.raises(QueryFailed) as refused:
                warehouse.queries.execute(sql)  # no syntax-tree check on this path
            assert refused.value.reason == "refused", sql
            assert "readonly" in str(refused.value), sql
        # The sink's own client still writes.
        warehouse.command("ALTER TABLE events ADD COLUMN IF NOT EXISTS extra UInt8")
        assert "extra" in warehouse.columns("events")
    finally:
        warehouse.close()


def test_every_query_carries_the_bounds_on_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Embedded: the real engine; the query handle's session has the bounds, and so has
    # each query it sends.
    settings = WarehouseSettings(
        dsn=f"chdb://{tmp_path / 'wh'}", query_timeout_s=7, query_max_rows=123
    )
    warehouse = Warehouse(settings)
    sent: list[dict[str, str] | None] = []
    try:
        warehouse.ensure_table("events")
        warehouse.queries.execute("SELECT 1")  # opens the query handle
        client = warehouse.queries._client
        original = client.query

        def spy(sql: str, *args: Any, **kwargs: Any) -> Any:
            sent.append(kwargs.get("settings"))
            return original(sql, *args, **kwargs)

        monkeypatch.setattr(client, "query", spy)
        session = dict(
            client.query(
                "SELECT name, value FROM system.settings WHERE name IN "
                "('readonly', 'max_execution_time', 'max_result_rows', 'result_overflow_mode')"
            ).result_rows
        )
        assert session == {
            "readonly": "1",
            "max_execution_time": "7",
            "max_result_rows": "123",
            "result_overflow_mode": "throw",
        }
        sent.clear()
        assert warehouse.read_only_query("SELECT count() FROM events").rows == [[0]]
    finally:
        warehouse.close()
    expected = query_settings(settings)
    assert len(sent) == 3  # the parse, the syntax tree, the query
    assert all(s == expected for s in sent)
    assert list(expected)[-1] == "readonly"

    # A server: no server here, so the client factory records what each query is sent with.
    calls: list[dict[str, Any]] = []
    queries: list[tuple[str, dict[str, str] | None]] = []

    class Result:
        def __init__(self, sql: str) -> None:
            self.column_names = ("x",)
            self.result_rows: list[tuple[Any, ...]]
            if sql.startswith("SELECT formatQuery"):
                self.result_rows = [("SELECT x FROM events",)]
            elif sql.startswith("EXPLAIN AST"):
                self.result_rows = [
                    ("SelectWithUnionQuery (children 1)",),
                    (" ExpressionList (children 1)",),
                    ("  SelectQuery (children 2)",),
                    ("   ExpressionList (children 1)",),
                    ("    Identifier x",),
                    ("   TablesInSelectQuery (children 1)",),
                    ("    TablesInSelectQueryElement (children 1)",),
                    ("     TableExpression (children 1)",),
                    ("      TableIdentifier events",),
                ]
            else:
                self.result_rows = [(1,)]

    class Client:
        def query(self, sql: str, **kwargs: Any) -> Result:
            queries.append((sql, kwargs.get("settings")))
            return Result(sql)

        def close(self) -> None:
            pass

    def get_client(**kwargs: Any) -> Client:
        calls.append(kwargs)
        return Client()

    monkeypatch.setattr("clickhouse_connect.get_client", get_client)
    server = WarehouseSettings(
        dsn="http://clickhouse.example:8123",
        username="sink",
        password=SecretStr("sink-secret"),
        query_username="reader",
        query_password=SecretStr("reader-secret"),
        query_timeout_s=9,
    )
    remote = Warehouse(server)
    assert remote.read_only_query("SELECT x FROM events").rows == [[1]]
    assert remote.read_only_query("SELECT x FROM events").rows == [[1]]
    remote.close()
    assert [c["username"] for c in calls] == ["sink", "reader"]
    assert calls[1]["password"] == "reader-secret"
    assert calls[1]["send_receive_timeout"] > 9
    assert len(queries) == 6
    assert all(s == query_settings(server) for _, s in queries)
    assert query_settings(server)["readonly"] == "1"
    assert query_settings(server)["max_execution_time"] == "9"


def test_compose_publishes_the_query_port_on_loopback_only_with_a_token() -> None:
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.kafka.yml").read_text())
    sink = compose["services"]["sink"]
    for port in sink.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), port
    assert sink["environment"]["SLUICE_WAREHOUSE_QUERY_TOKEN"].startswith(
        "${SLUICE_WAREHOUSE_QUERY_TOKEN"
    )
