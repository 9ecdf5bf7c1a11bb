"""The tool runner: runs one workflow step's tool as a job of the workflow queue.

The orchestrator submits a job per step command to the workflow queue (its executor is
`connectors.workflows.tools:run_step`); the payload names the command and holds the
tool with its templates rendered (`core.workflows.events`). `run_step` writes
`command.claimed`, runs the tool, then writes `command.completed` (the result) or
`command.failed` (the error, and `output`: what the step's retry rules see) to
`sluice.workflows.events`, keyed by the execution id, and waits for Kafka's ack of that
one before the job ends. A failed tool fails the job as well (DEAD, no retry of its own:
the step's policy decides on retries).

Tools (`run_tool`):

- `python`: the code in a new `python -I -S` process (own process group, a fresh working
  directory removed afterwards, an environment of PATH, HOME and the names in
  `SLUICE_WORKFLOWS_PYTHON_ENV` only), killed with its children at the timeout or when
  the job is cancelled;
- `http`: one request (method, url, headers, params, `payload` as JSON or `body` as
  text); the result is `{status, headers, data}`; a non-2xx status fails the step with
  `output.http.status`;
- `postgres`: the statements of `query` (or `command`) on a connection made from a named
  credential, `statement_timeout` the step's timeout; the result holds `command_<i>`
  per statement: `rows` (objects), `row_count`, `columns`;
- `duckdb`: the same, in an embedded in-memory DuckDB made for the step;
- `warehouse`: one read-only query through the sink's query endpoint (its token, its
  checks and limits).

A credential named by `auth` is resolved here, when the step runs, and every secret of
it is redacted from the result and the error before they are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog
from yarl import URL

from connectors.jobs.executor import Fatal, JobContext
from connectors.webhook import PublicResolver, refused_address
from core.producer import EventProducer
from core.settings import JobSettings, KafkaSettings, WarehouseSettings, WorkflowSettings
from core.topics import Topics
from core.workflows import events as ev
from core.workflows.credentials import Credential, CredentialError, redact, resolve

log = structlog.get_logger("sluice.workflows.tools")

PYTHON_STEP = Path(__file__).with_name("python_step.py")
# Output of a python step kept for its error (the tail), and of an http response read.
MAX_LOG_BYTES = 4000
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
RESULT_FILE = ".sluice-result.json"
# Where the runner's libraries are: a python step (run without `site`) imports from there.
SITE_PATHS = [p for p in sys.path if p.endswith("-packages")]


class ToolFailed(Exception):
    """A tool that did not succeed: the reason, and what the step's policy rules see."""

    def __init__(self, message: str, output: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.output = {"status": "error", "error": message, **(output or {})}


# --- python ------------------------------------------------------------------------


async def _drain(stream: asyncio.StreamReader | None, keep: bytearray) -> None:
    """Read a stream to its end, keeping its last MAX_LOG_BYTES."""
    if stream is None:
        return
    while chunk := await stream.read(65536):
        keep.extend(chunk)
        if len(keep) > MAX_LOG_BYTES:
            del keep[: len(keep) - MAX_LOG_BYTES]


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """The exit status of `proc` once it exited, whoever still holds its pipes.

    (`Process.wait()` of Python 3.11 also waits for the pipes to close, which a child the
    step left behind keeps open.)
    """
    delay = 0.002
    while proc.returncode is None:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
    return proc.returncode


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


async def run_python(tool: dict[str, Any], timeout_s: float, settings: WorkflowSettings) -> Any:
    code = tool.get("code")
    given = tool.get("input") or {}
    if not isinstance(code, str):
        raise ToolFailed("a python step needs its code as text")
    if not isinstance(given, dict):
        raise ToolFailed("a python step's input must be an object")
    # The outcome file sits beside the step's working directory, not in it.
    base = Path(tempfile.mkdtemp(prefix="sluice-step-"))
    work = base / "work"
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)}
    env.update({n: os.environ[n] for n in settings.python_env if n in os.environ})
    out_file = base / RESULT_FILE
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            str(PYTHON_STEP),
            str(out_file),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=work,
            env=env,
            start_new_session=True,
        )
        logs = bytearray()
        # The pipes are read while the step runs; the step is done when its process exits
        # (what it started and left behind may hold the pipes: it goes with the group).
        readers = asyncio.gather(_drain(proc.stdout, logs), _drain(proc.stderr, logs))
        try:
            async with asyncio.timeout(timeout_s):
                assert proc.stdin is not None
                request = {"code": code, "input": given, "path": SITE_PATHS}
                proc.stdin.write(orjson.dumps(request, default=str))
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    await proc.stdin.drain()
                proc.stdin.close()
                status = await _exited(proc)
        except TimeoutError:
            raise ToolFailed(f"timeout: the python step ran over {timeout_s:g} s") from None
        finally:
            # The step's group goes with it (its own children too), also on a cancel.
            _kill(proc.pid)
            if proc.returncode is None:
                await proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(readers, 2)
        try:
            outcome = orjson.loads(out_file.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            tail = logs.decode("utf-8", "replace").strip()[-1000:]
            raise ToolFailed(
                f"the python step ended (status {status}) without an outcome: {tail}"
            ) from None
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if not outcome.get("ok"):
        raise ToolFailed(str(outcome.get("error")), {"traceback": outcome.get("traceback")})
    return outcome.get("result")


# --- http ----------------------------------------------------------------------------

# One client session per event loop and address policy (a session is bound to its loop).
_SESSIONS: dict[tuple[int, bool], aiohttp.ClientSession] = {}


def _session(block_private: bool) -> aiohttp.ClientSession:
    key = (id(asyncio.get_running_loop()), block_private)
    session = _SESSIONS.get(key)
    if session is None or session.closed or session.loop is not asyncio.get_running_loop():
        resolver = PublicResolver() if block_private else None
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=resolver, limit=100)
        )
        _SESSIONS[key] = session
    return session


def _auth_headers(credential: Credential | None) -> dict[str, str]:
    if credential is None:
        return {}
    fields = credential.fields
    if fields is not None and isinstance(fields.get("headers"), dict):
        return {str(k): str(v) for k, v in fields["headers"].items()}
    token = fields.get("token") if fields is not None else credential.value
    if not isinstance(token, str) or not token:
        raise ToolFailed(
            f"credential {credential.name!r} has neither a token nor headers for an http step"
        )
    return {"Authorization": f"Bearer {token}"}


async def run_http(
    tool: dict[str, Any], timeout_s: float, jobs: JobSettings, credential: Credential | None
) -> Any:
    url = tool.get("url") or tool.get("endpoint")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ToolFailed(f"an http step needs a http:// or https:// url, not {url!r}")
    method = str(tool.get("method") or "GET").upper()
    headers = {str(k): str(v) for k, v in (tool.get("headers") or {}).items()}
    headers.update(_auth_headers(credential))
    params = {str(k): str(v) for k, v in (tool.get("params") or {}).items()}
    host = URL(url).raw_host or ""
    reason = refused_address(host) if jobs.block_private_targets else None
    # A name is checked when it is resolved (PublicResolver), an address here.
    if reason is not None and "not an IP address" not in reason:
        raise ToolFailed(f"{reason} (SLUICE_JOBS_BLOCK_PRIVATE_TARGETS)")
    body: dict[str, Any] = {}
    if tool.get("payload") is not None:
        body["data"] = orjson.dumps(tool["payload"], default=str)
        headers.setdefault("Content-Type", "application/json")
    elif tool.get("body") is not None:
        body["data"] = str(tool["body"]).encode()
    try:
        async with _session(jobs.block_private_targets).request(
            method,
            url,
            headers=headers,
            params=params,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            **body,
        ) as resp:
            raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
            if len(raw) > MAX_RESPONSE_BYTES:
                raise ToolFailed(f"the response is over {MAX_RESPONSE_BYTES} bytes")
            try:
                data: Any = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                data = raw.decode("utf-8", "replace")
            # Header names as plain text (multidict's are a str subclass JSON refuses).
            headers_out = {str(k): v for k, v in resp.headers.items()}
            result = {"status": resp.status, "headers": headers_out, "data": data}
            if not 200 <= resp.status < 300:
                raise ToolFailed(
                    f"HTTP {resp.status}", {"http": {"status": resp.status}, "data": data}
                )
            return result
    except TimeoutError:
        raise ToolFailed(f"timeout: no answer from {url} within {timeout_s:g} s") from None
    except aiohttp.ClientConnectorError as exc:
        # The resolver's refusal of a private address is the OS error's message.
        reason = str(exc.os_error) if exc.os_error is not None else str(exc)
        raise ToolFailed(f"{method} {url}: {type(exc).__name__}: {reason}") from None
    except aiohttp.ClientError as exc:
        raise ToolFailed(f"{method} {url}: {type(exc).__name__}: {exc}") from None


# --- SQL -----------------------------------------------------------------------------


def _too_big(value: Any) -> bool:
    """An integer past 64 bits (HUGEINT, NUMERIC): as a JSON number it does not survive."""
    return isinstance(value, int) and not -(2**63) <= value < 2**64


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID | dt.timedelta) or _too_big(value):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _statement(columns: list[str] | None, rows: list[Any], count: int) -> dict[str, Any]:
    if columns is None:
        return {"rows": [], "row_count": count, "columns": []}
    return {
        "rows": [{c: _plain(v) for c, v in zip(columns, row, strict=True)} for row in rows],
        "row_count": len(rows),
        "columns": columns,
    }


def _sql(tool: dict[str, Any]) -> str:
    sql = tool.get("query") or tool.get("command")
    if not isinstance(sql, str) or not sql.strip():
        raise ToolFailed("the step needs SQL in query (or command)")
    return sql


async def run_postgres(
    tool: dict[str, Any], timeout_s: float, credential: Credential | None
) -> Any:
    import psycopg  # noqa: PLC0415 - only postgres steps need it
    from psycopg.conninfo import make_conninfo  # noqa: PLC0415

    if credential is None:
        raise ToolFailed("a postgres step needs auth: the name of a credential")
    if credential.fields is not None:
        params = {str(k): str(v) for k, v in credential.fields.items()}
        if "database" in params and "dbname" not in params:
            params["dbname"] = params.pop("database")
        conninfo = make_conninfo(**params)
    else:
        conninfo = credential.value
    sql = _sql(tool)
    out: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout_s + 5):
            conn = await psycopg.AsyncConnection.connect(
                conninfo,
                autocommit=True,
                connect_timeout=max(2, int(timeout_s)),
                options=f"-c statement_timeout={int(timeout_s * 1000)}",
            )
            async with conn, conn.cursor() as cur:
                await cur.execute(sql.encode())
                index = 0
                while True:
                    columns = [d.name for d in cur.description] if cur.description else None
                    rows = await cur.fetchall() if columns is not None else []
                    out[f"command_{index}"] = _statement(columns, rows, cur.rowcount)
                    index += 1
                    if not cur.nextset():
                        break
    except TimeoutError:
        raise ToolFailed(f"timeout: the postgres step ran over {timeout_s:g} s") from None
    except psycopg.Error as exc:
        raise ToolFailed(f"postgres: {str(exc).strip()}") from None
    return out


def _duckdb(sql: str, state: dict[str, Any]) -> dict[str, Any]:
    import duckdb  # noqa: PLC0415 - only duckdb steps need it

    conn = duckdb.connect(":memory:")
    state["conn"] = conn
    try:
        out: dict[str, Any] = {}
        for index, statement in enumerate(conn.extract_statements(sql)):
            cursor = conn.execute(statement)
            if cursor.description is not None and statement.type.name in ("SELECT", "EXPLAIN"):
                columns = [d[0] for d in cursor.description]
                out[f"command_{index}"] = _statement(columns, cursor.fetchall(), 0)
            else:
                out[f"command_{index}"] = {"rows": [], "row_count": -1, "columns": []}
        return out
    finally:
        conn.close()


async def run_duckdb(tool: dict[str, Any], timeout_s: float) -> Any:
    import duckdb  # noqa: PLC0415

    sql = _sql(tool)
    state: dict[str, Any] = {}
    task = asyncio.ensure_future(asyncio.to_thread(_duckdb, sql, state))
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(task)
    except (TimeoutError, asyncio.CancelledError) as exc:
        conn = state.get("conn")
        if conn is not None:
            conn.interrupt()
        with_timeout = isinstance(exc, TimeoutError)
        # Interrupted: the reason is the timeout or the cancel, not what the query raises.
        with contextlib.suppress(Exception):
            await task
        if with_timeout:
            raise ToolFailed(f"timeout: the duckdb step ran over {timeout_s:g} s") from None
        raise
    except duckdb.Error as exc:
        raise ToolFailed(f"duckdb: {exc}") from None


async def run_warehouse(tool: dict[str, Any], timeout_s: float) -> Any:
    from connectors.warehouse.query_auth import configured_token  # noqa: PLC0415

    sql = tool.get("query")
    if not isinstance(sql, str) or not sql.strip():
        raise ToolFailed("a warehouse step needs its query")
    wh = WarehouseSettings()
    token = configured_token(wh)
    if token is None:
        raise ToolFailed("no token of the warehouse's query endpoint here (SLUICE_WAREHOUSE_*)")
    url = f"http://{wh.query_host}:{wh.query_port}/query"
    try:
        async with _session(False).post(
            url,
            data=orjson.dumps({"sql": sql}),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            answer = orjson.loads(await resp.read() or b"null")
    except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
        raise ToolFailed(f"the warehouse's query endpoint: {exc}") from None
    except TimeoutError:
        raise ToolFailed(f"timeout: the warehouse query ran over {timeout_s:g} s") from None
    if resp.status != 200 or not isinstance(answer, dict):
        reason = answer.get("error") if isinstance(answer, dict) else answer
        raise ToolFailed(f"warehouse: {reason}", {"http": {"status": resp.status}})
    columns = list(answer.get("columns") or [])
    rows = [dict(zip(columns, row, strict=False)) for row in answer.get("rows") or []]
    return {"rows": rows, "row_count": len(rows), "columns": columns}


# --- the job function ----------------------------------------------------------------


async def run_tool(
    tool: dict[str, Any], timeout_s: float, settings: WorkflowSettings, jobs: JobSettings
) -> Any:
    """Run one rendered tool; its result, or ToolFailed (secrets redacted from both)."""
    kind = tool.get("kind")
    secrets: tuple[str, ...] = ()
    try:
        credential: Credential | None = None
        if tool.get("auth") is not None:
            credential = resolve(tool["auth"], settings.credentials_dir)
            secrets = credential.secrets
        if kind == "python":
            result = await run_python(tool, timeout_s, settings)
        elif kind == "http":
            result = await run_http(tool, timeout_s, jobs, credential)
        elif kind == "postgres":
            result = await run_postgres(tool, timeout_s, credential)
        elif kind == "duckdb":
            result = await run_duckdb(tool, timeout_s)
        elif kind == "warehouse":
            result = await run_warehouse(tool, timeout_s)
        else:
            raise ToolFailed(f"unsupported tool kind {kind!r} here")
    except CredentialError as exc:
        raise ToolFailed(str(exc)) from None
    except ToolFailed as exc:
        if secrets:
            exc.message = redact(exc.message, secrets)
            exc.output = redact(exc.output, secrets)
            exc.args = (exc.message,)
        raise
    except Exception as exc:  # a tool's unexpected error is the step's failure, redacted
        log.warning("a workflow tool raised", tool=kind, error=type(exc).__name__)
        raise ToolFailed(redact(f"{kind}: {type(exc).__name__}: {exc}", secrets)) from None
    return redact(result, secrets) if secrets else result


class _Runner:
    """What the job function shares in a worker process: settings and one producer."""

    def __init__(self) -> None:
        self.kafka = KafkaSettings()
        self.settings = WorkflowSettings()
        self.jobs = JobSettings()
        self.topic = Topics(self.kafka.topic_prefix).workflows_events
        self.producer = EventProducer(self.kafka, timeout_s=30.0, linger_ms=2)

    async def send(self, evt: dict[str, Any], wait: bool) -> None:
        record = (evt["execution_id"].encode(), ev.encode(evt), None)
        if wait:
            await self.producer.send_batch(self.topic, [record])
        else:
            task = asyncio.ensure_future(self.producer.send_each(self.topic, [record]))
            task.add_done_callback(_forget)


def _forget(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a command.claimed event was not written", error=str(task.exception()))


# The job worker calls the function in its event loop; the settings come from its
# environment, and one producer serves every step the process runs.
_RUNNER: _Runner | None = None
_RUNNER_LOCK = threading.Lock()


def _runner() -> _Runner:
    global _RUNNER  # noqa: PLW0603 - one per process, made on first use
    with _RUNNER_LOCK:
        if _RUNNER is None:
            _RUNNER = _Runner()
        return _RUNNER


def _check(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise Fatal("a workflow step job's payload must be an object")
    for name in ("execution_id", "step", "command_id"):
        if not isinstance(payload.get(name), str) or not payload[name]:
            raise Fatal(f"a workflow step job needs {name} (text)")
    if not isinstance(payload.get("attempt", 1), int):
        raise Fatal("a workflow step job's attempt must be a number")
    tool = payload.get("tool")
    if not isinstance(tool, dict) or not isinstance(tool.get("kind"), str):
        raise Fatal("a workflow step job needs its tool (an object with a kind)")
    return payload


async def run_step(payload: Any, job: JobContext) -> dict[str, Any]:
    """The workflow queue's job function: run the step's tool, write its outcome."""
    step = _check(payload)
    runner = _runner()
    eid, cid = step["execution_id"], step["command_id"]
    common: dict[str, Any] = {
        "step": step["step"],
        "command_id": cid,
        "attempt": step.get("attempt", 1),
        "job_id": job.id,
        "tool": step["tool"]["kind"],
        "instance": step.get("instance"),
        "iteration": step.get("iteration"),
        "task": step.get("task"),
    }
    await runner.send(ev.event(eid, ev.COMMAND_CLAIMED, f"{cid}:claimed", **common), wait=False)
    timeout_s = float(step.get("timeout_s") or runner.settings.timeout_s)
    if job.deadline_ms:
        timeout_s = max(0.1, min(timeout_s, job.deadline_ms / 1000 - time.time() - 1))
    started = time.monotonic()
    try:
        result = await run_tool(step["tool"], timeout_s, runner.settings, runner.jobs)
        try:
            size = len(orjson.dumps(result, default=str))
        except TypeError as exc:
            raise ToolFailed(f"the result is not JSON: {exc}") from None
        if size > runner.settings.max_result_bytes:
            raise ToolFailed(
                f"the result is {size} bytes, over {runner.settings.max_result_bytes}"
                " (SLUICE_WORKFLOWS_MAX_RESULT_BYTES)"
            )
    except ToolFailed as exc:
        took = int((time.monotonic() - started) * 1000)
        await runner.send(
            ev.event(
                eid,
                ev.COMMAND_FAILED,
                f"{cid}:failed",
                **common,
                error=exc.message,
                output=exc.output,
                duration_ms=took,
            ),
            wait=True,
        )
        raise Fatal(exc.message) from None
    took = int((time.monotonic() - started) * 1000)
    await runner.send(
        ev.event(
            eid, ev.COMMAND_COMPLETED, f"{cid}:completed", **common, result=result, duration_ms=took
        ),
        wait=True,
    )
    return {"command_id": cid, "status": "ok"}
