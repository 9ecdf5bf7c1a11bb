"""The tools of workflow steps, run for real without a broker: python steps in their own
process (result, errors, timeout with their children, environment, working directory),
duckdb, http against a local aiohttp server (address policy, credentials redacted),
postgres against a local server, and the credentials with their redaction."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.jobs.executor import Fatal, JobContext
from connectors.workflows import tools
from connectors.workflows.tools import (
    ToolFailed,
    run_duckdb,
    run_http,
    run_python,
    run_tool,
)
from core.settings import JobSettings, WorkflowSettings
from core.workflows import events as ev
from core.workflows.credentials import MASK, CredentialError, env_name, redact, resolve
from ops.baseline_services import (
    BASE_DIR,
    PostgresServer,
    ensure_packages,
    postgres_bin_dir,
    postgres_server,
)
from ops.errors import ProcessError

OPEN = JobSettings(block_private_targets=False)
BLOCKING = JobSettings(block_private_targets=True)


def _settings(**fields: Any) -> WorkflowSettings:
    return WorkflowSettings(**fields)


def _exists(path: str | Path) -> bool:
    return Path(path).exists()


def _dead(pid: int) -> bool:
    """Whether process `pid` is gone (or a zombie: killed, not yet reaped by its new parent)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return "Z" in state.split(":", 1)[-1].split()[:1]


async def _until_dead(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while not _dead(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _python(code: str, timeout_s: float = 10.0, **given: Any) -> Any:
    return await run_python(
        {"kind": "python", "code": code, "input": given}, timeout_s, _settings()
    )


# --- python ------------------------------------------------------------------------


async def test_main_is_called_with_the_input_keys_its_signature_takes() -> None:
    code = "def main(x, y):\n    return {'sum': x + y, 'x': x}\n"
    assert await _python(code, x=2, y=3, z="ignored") == {"sum": 5, "x": 2}


async def test_a_main_with_keyword_arguments_gets_every_input_key() -> None:
    code = "def main(**given):\n    return sorted(given)\n"
    assert await _python(code, b=1, a=2) == ["a", "b"]


async def test_input_keys_are_variables_and_result_is_the_result_without_main() -> None:
    code = "result = {'total': sum(values), 'name': name.upper()}\n"
    assert await _python(code, values=[1, 2, 3], name="ada") == {"total": 6, "name": "ADA"}


async def test_a_step_with_neither_main_nor_result_has_no_result() -> None:
    assert await _python("x = 1\n") is None


async def test_what_a_step_prints_does_not_garble_its_result() -> None:
    code = (
        "import sys\n"
        'print(\'{"ok": false, "error": "forged"}\')\n'
        "print('noise ' * 10000)\n"
        "sys.stderr.write('warning on stderr\\n')\n"
        "result = {'value': [1, 2.5, 'three', None, True]}\n"
    )
    assert await _python(code) == {"value": [1, 2.5, "three", None, True]}


async def test_an_exception_in_the_code_fails_the_step_with_its_type_and_text() -> None:
    code = "def main(n):\n    raise ValueError(f'bad input {n}')\n"
    with pytest.raises(ToolFailed) as failed:
        await _python(code, n=42)
    assert failed.value.message == "ValueError: bad input 42"
    assert str(failed.value) == "ValueError: bad input 42"
    assert failed.value.output["status"] == "error"
    assert failed.value.output["error"] == "ValueError: bad input 42"
    assert "ValueError: bad input 42" in failed.value.output["traceback"]


async def test_a_syntax_error_fails_the_step() -> None:
    with pytest.raises(ToolFailed, match=r"^SyntaxError: "):
        await _python("def main(:\n")


@pytest.mark.parametrize(
    ("expression", "reason"),
    [("{1, 2}", "set"), ("object()", "object"), ("float('nan')", "Out of range")],
)
async def test_a_result_that_is_not_json_fails_the_step(expression: str, reason: str) -> None:
    with pytest.raises(ToolFailed) as failed:
        await _python(f"result = {expression}\n")
    assert failed.value.message.startswith("the result is not JSON: ")
    assert reason in failed.value.message


async def test_a_step_that_dies_without_an_outcome_fails_with_its_status_and_output() -> None:
    code = "import os\nos.write(2, b'last words')\nos._exit(3)\n"
    with pytest.raises(ToolFailed) as failed:
        await _python(code)
    assert "(status 3) without an outcome" in failed.value.message
    assert failed.value.message.endswith("last words")


async def test_a_step_over_its_timeout_is_killed_with_the_processes_it_started(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids.json"
    code = (
        "import json, os, subprocess, time\n"
        "child = subprocess.Popen(['sleep', '30'])\n"
        "with open(pid_file, 'w') as out:\n"
        "    json.dump([os.getpid(), child.pid], out)\n"
        "time.sleep(30)\n"
    )
    started = time.monotonic()
    with pytest.raises(ToolFailed) as failed:
        await _python(code, timeout_s=1, pid_file=str(pids))
    took = time.monotonic() - started
    assert failed.value.message.startswith("timeout: ")
    assert "1 s" in failed.value.message
    assert took < 3, took
    step, grandchild = orjson.loads(pids.read_bytes())
    assert await _until_dead(step), f"the step's process {step} is still running"
    assert await _until_dead(grandchild), f"the step's child {grandchild} is still running"


async def test_a_step_that_ends_leaving_a_child_behind_succeeds_at_once() -> None:
    code = "import subprocess\nsubprocess.Popen(['sleep', '30'])\nresult = 'done'\n"
    started = time.monotonic()
    assert await _python(code, timeout_s=2) == "done"
    assert time.monotonic() - started < 1.5


async def test_a_step_sees_only_path_home_and_the_variables_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICE_SECRET_X", "do-not-leak")
    monkeypatch.setenv("MY_VAR", "visible-value")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    code = (
        "import os\n"
        "result = {\n"
        "    'secret': os.environ.get('SLUICE_SECRET_X'),\n"
        "    'mine': os.environ.get('MY_VAR'),\n"
        "    'names': sorted(os.environ),\n"
        "    'home': os.environ.get('HOME'),\n"
        "    'cwd': os.getcwd(),\n"
        "}\n"
    )
    settings = _settings(python_env=("MY_VAR", "NOT_SET_ANYWHERE"))
    seen = await run_python({"code": code}, 10, settings)
    assert seen["secret"] is None
    assert seen["mine"] == "visible-value"
    # Python itself may set LC_CTYPE (locale coercion); nothing else may be there.
    assert set(seen["names"]) - {"LC_CTYPE"} == {"PATH", "HOME", "MY_VAR"}
    assert seen["home"] == seen["cwd"]


async def test_the_working_directory_of_a_step_is_removed_afterwards() -> None:
    cwd = await _python(
        "import os\nopen('left-behind.txt', 'w').write('x')\nresult = os.getcwd()\n"
    )
    assert isinstance(cwd, str)
    assert cwd.startswith("/")
    assert not _exists(cwd)
    # The outcome file sat beside it, in a directory of the step's own: gone as well.
    assert not _exists(Path(cwd).parent)


async def test_the_working_directory_of_a_failed_step_is_removed_too(tmp_path: Path) -> None:
    where = tmp_path / "cwd.txt"
    code = "import os\nopen(where, 'w').write(os.getcwd())\nraise RuntimeError('no')\n"
    with pytest.raises(ToolFailed, match="RuntimeError: no"):
        await _python(code, where=str(where))
    assert not _exists(where.read_text())


async def test_a_python_step_needs_code_as_text() -> None:
    with pytest.raises(ToolFailed, match="code as text"):
        await run_python({"kind": "python"}, 5, _settings())
    with pytest.raises(ToolFailed, match="input must be an object"):
        await run_python({"kind": "python", "code": "x = 1", "input": [1]}, 5, _settings())


# --- duckdb --------------------------------------------------------------------------


async def test_duckdb_runs_each_statement_and_returns_the_rows_of_a_select() -> None:
    sql = (
        "CREATE TABLE people (id INTEGER, name TEXT, born DATE);"
        " INSERT INTO people VALUES (1, 'ada', DATE '1815-12-10'), (2, 'grace', NULL);"
        " SELECT id, name, born FROM people ORDER BY id"
    )
    result = await run_duckdb({"kind": "duckdb", "query": sql}, 10)
    assert set(result) == {"command_0", "command_1", "command_2"}
    assert result["command_2"] == {
        "rows": [
            {"id": 1, "name": "ada", "born": "1815-12-10"},
            {"id": 2, "name": "grace", "born": None},
        ],
        "row_count": 2,
        "columns": ["id", "name", "born"],
    }
    assert result["command_0"]["rows"] == []
    # The result goes into an event: it must be plain JSON.
    assert orjson.loads(orjson.dumps(result)) == result


async def test_each_duckdb_step_has_a_database_of_its_own() -> None:
    await run_duckdb({"query": "CREATE TABLE mine (a INTEGER)"}, 10)
    with pytest.raises(ToolFailed, match="mine"):
        await run_duckdb({"query": "SELECT * FROM mine"}, 10)


async def test_a_duckdb_error_fails_the_step_naming_it() -> None:
    with pytest.raises(ToolFailed) as failed:
        await run_duckdb({"query": "SELECT 1; SELECT * FROM no_such_table"}, 10)
    assert failed.value.message.startswith("duckdb: ")
    assert "no_such_table" in failed.value.message


async def test_a_duckdb_step_needs_sql() -> None:
    with pytest.raises(ToolFailed, match="needs SQL"):
        await run_duckdb({"query": "   "}, 10)


async def test_a_long_duckdb_query_is_interrupted_at_its_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(ToolFailed) as failed:
        await run_duckdb({"query": "SELECT sum(range) FROM range(1000000000000)"}, 1)
    assert failed.value.message.startswith("timeout: ")
    assert time.monotonic() - started < 4


# --- http ----------------------------------------------------------------------------

SEEN = web.AppKey("seen", list[dict[str, Any]])


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    """A local HTTP server that records what it receives and answers a few routes."""
    app = web.Application()
    app[SEEN] = []

    async def record(request: web.Request) -> dict[str, Any]:
        body = await request.read()
        seen = {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "headers": dict(request.headers),
            "body": body,
        }
        request.app[SEEN].append(seen)
        return seen

    async def hello(request: web.Request) -> web.Response:
        seen = await record(request)
        return web.json_response(
            {"hello": "world", "query": seen["query"]}, headers={"X-Test": "yes"}
        )

    async def echo(request: web.Request) -> web.Response:
        seen = await record(request)
        return web.json_response(
            {"received": orjson.loads(seen["body"]), "type": request.content_type}
        )

    async def text(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="plain words")

    async def down(request: web.Request) -> web.Response:
        seen = await record(request)
        auth = seen["headers"].get("Authorization")
        return web.json_response({"error": "down", "authorization": auth}, status=503)

    async def whoami(request: web.Request) -> web.Response:
        seen = await record(request)
        headers = seen["headers"]
        return web.json_response(
            {"authorization": headers.get("Authorization"), "key": headers.get("X-Api-Key")}
        )

    app.router.add_get("/hello", hello)
    app.router.add_post("/echo", echo)
    app.router.add_get("/text", text)
    app.router.add_get("/down", down)
    app.router.add_get("/whoami", whoami)
    running = TestServer(app, host="127.0.0.1")
    async with running:
        yield running
    # The tool keeps one client session per event loop; this test's loop ends here.
    for key, session in list(tools._SESSIONS.items()):
        await session.close()
        del tools._SESSIONS[key]


def _seen(server: TestServer) -> list[dict[str, Any]]:
    return server.app[SEEN]


async def test_a_get_returns_the_status_headers_and_json_data(server: TestServer) -> None:
    url = str(server.make_url("/hello"))
    result = await run_http({"url": url, "params": {"page": 2}}, 5, OPEN, None)
    assert result["status"] == 200
    assert result["data"] == {"hello": "world", "query": {"page": "2"}}
    assert result["headers"]["X-Test"] == "yes"
    assert _seen(server)[0]["method"] == "GET"


async def test_a_post_sends_its_payload_as_json(server: TestServer) -> None:
    url = str(server.make_url("/echo"))
    payload = {"name": "ada", "tags": ["a", "b"], "n": 1}
    result = await run_http(
        {"method": "post", "url": url, "payload": payload, "headers": {"X-Trace": "t1"}},
        5,
        OPEN,
        None,
    )
    assert result["data"] == {"received": payload, "type": "application/json"}
    (seen,) = _seen(server)
    assert seen["method"] == "POST"
    assert seen["headers"]["X-Trace"] == "t1"
    assert orjson.loads(seen["body"]) == payload


async def test_a_response_that_is_not_json_is_its_text(server: TestServer) -> None:
    result = await run_http({"url": str(server.make_url("/text"))}, 5, OPEN, None)
    assert result["data"] == "plain words"


async def test_a_non_2xx_status_fails_the_step_with_the_status_for_its_rules(
    server: TestServer,
) -> None:
    with pytest.raises(ToolFailed) as failed:
        await run_http({"url": str(server.make_url("/down"))}, 5, OPEN, None)
    assert failed.value.message == "HTTP 503"
    assert failed.value.output["http"]["status"] == 503
    assert failed.value.output["data"]["error"] == "down"


async def test_a_private_address_is_refused_when_private_targets_are_blocked(
    server: TestServer,
) -> None:
    url = f"http://127.0.0.1:{server.port}/hello"
    with pytest.raises(ToolFailed) as failed:
        await run_http({"url": url}, 5, BLOCKING, None)
    assert "127.0.0.1 is loopback" in failed.value.message
    assert "SLUICE_JOBS_BLOCK_PRIVATE_TARGETS" in failed.value.message
    assert _seen(server) == []


async def test_a_name_of_a_private_address_is_refused_when_private_targets_are_blocked(
    server: TestServer,
) -> None:
    url = f"http://localhost:{server.port}/hello"
    with pytest.raises(ToolFailed) as failed:
        await run_http({"url": url}, 5, BLOCKING, None)
    assert failed.value.message.startswith(f"GET {url}: ")
    assert _seen(server) == []


async def test_the_refusal_of_a_name_of_a_private_address_names_the_reason(
    server: TestServer,
) -> None:
    url = f"http://localhost:{server.port}/hello"
    with pytest.raises(ToolFailed) as failed:
        await run_http({"url": url}, 5, BLOCKING, None)
    assert "no public address" in failed.value.message


async def test_an_http_step_needs_an_http_url() -> None:
    with pytest.raises(ToolFailed, match="http:// or https://"):
        await run_http({"url": "file:///etc/passwd"}, 5, OPEN, None)


async def test_a_credential_is_sent_as_a_bearer_token_and_redacted_from_the_result(
    server: TestServer, tmp_path: Path
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    (tmp_path / "api_token").write_text(token + "\n")
    tool = {"kind": "http", "url": str(server.make_url("/whoami")), "auth": "api_token"}
    result = await run_tool(tool, 5, _settings(credentials_dir=tmp_path), OPEN)
    assert _seen(server)[0]["headers"]["Authorization"] == f"Bearer {token}"
    assert result["data"]["authorization"] == f"Bearer {MASK}"
    assert token not in json.dumps(result)


async def test_a_credential_is_redacted_from_a_failed_requests_error_too(
    server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("SLUICE_CREDENTIAL_API_TOKEN", token)
    tool = {"kind": "http", "url": str(server.make_url("/down")), "auth": "api-token"}
    with pytest.raises(ToolFailed) as failed:
        await run_tool(tool, 5, _settings(credentials_dir=tmp_path), OPEN)
    assert _seen(server)[0]["headers"]["Authorization"] == f"Bearer {token}"
    assert failed.value.output["http"]["status"] == 503
    assert failed.value.output["data"]["authorization"] == f"Bearer {MASK}"
    assert token not in orjson.dumps(failed.value.output).decode()


async def test_a_credential_with_headers_sends_those_headers(
    server: TestServer, tmp_path: Path
) -> None:
    key = f"key-{uuid.uuid4().hex}"
    (tmp_path / "svc").write_text(orjson.dumps({"headers": {"X-Api-Key": key}}).decode())
    tool = {"kind": "http", "url": str(server.make_url("/whoami")), "auth": "svc"}
    result = await run_tool(tool, 5, _settings(credentials_dir=tmp_path), OPEN)
    assert _seen(server)[0]["headers"]["X-Api-Key"] == key
    assert "Authorization" not in _seen(server)[0]["headers"]
    assert result["data"] == {"authorization": None, "key": MASK}


# --- run_tool ------------------------------------------------------------------------


async def test_an_unsupported_tool_kind_fails_the_step() -> None:
    with pytest.raises(ToolFailed, match="unsupported tool kind 'bash'"):
        await run_tool({"kind": "bash", "code": "ls"}, 5, _settings(), OPEN)


async def test_a_credential_that_cannot_be_resolved_fails_the_step(tmp_path: Path) -> None:
    tool = {"kind": "duckdb", "query": "SELECT 1", "auth": "missing"}
    with pytest.raises(ToolFailed, match="no credential 'missing'"):
        await run_tool(tool, 5, _settings(credentials_dir=tmp_path), OPEN)


async def test_run_tool_runs_a_python_step() -> None:
    tool = {"kind": "python", "code": "def main(a):\n    return a * 2\n", "input": {"a": 21}}
    assert await run_tool(tool, 10, _settings(), OPEN) == 42


# --- run_step (the job function), with a runner that keeps its events -------------------


class _Runner:
    """What run_step uses of the real runner, its events encoded as they would be sent."""

    def __init__(self) -> None:
        self.settings = WorkflowSettings()
        self.jobs = OPEN
        self.events: list[dict[str, Any]] = []

    async def send(self, evt: dict[str, Any], wait: bool) -> None:
        self.events.append(ev.decode(ev.encode(evt)))


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> _Runner:
    fake = _Runner()
    monkeypatch.setattr(tools, "_RUNNER", fake)
    return fake


def _job_payload(tool: dict[str, Any]) -> dict[str, Any]:
    return {"execution_id": "e1", "step": "s", "command_id": "c1", "timeout_s": 10, "tool": tool}


def _job() -> JobContext:
    return JobContext(id="j1", queue="workflows", attempt=1, max_attempts=1, priority=0, tags=())


async def test_run_step_writes_claimed_then_completed_with_the_result(runner: _Runner) -> None:
    tool = {"kind": "python", "code": "result = {'n': 1}"}
    assert await tools.run_step(_job_payload(tool), _job()) == {"command_id": "c1", "status": "ok"}
    assert [e["type"] for e in runner.events] == [ev.COMMAND_CLAIMED, ev.COMMAND_COMPLETED]
    assert runner.events[-1]["result"] == {"n": 1}


async def test_run_step_writes_failed_with_the_output_and_ends_the_job(runner: _Runner) -> None:
    tool = {"kind": "python", "code": "raise KeyError('k')"}
    with pytest.raises(Fatal, match="KeyError"):
        await tools.run_step(_job_payload(tool), _job())
    failed = runner.events[-1]
    assert failed["type"] == ev.COMMAND_FAILED
    assert failed["output"]["status"] == "error"
    assert failed["error"] == "KeyError: 'k'"


async def test_run_step_writes_the_result_of_an_http_step(
    runner: _Runner, server: TestServer
) -> None:
    tool = {"kind": "http", "url": str(server.make_url("/hello"))}
    assert await tools.run_step(_job_payload(tool), _job()) == {"command_id": "c1", "status": "ok"}
    assert runner.events[-1]["type"] == ev.COMMAND_COMPLETED
    assert runner.events[-1]["result"]["status"] == 200


# --- credentials ---------------------------------------------------------------------


def test_a_credential_comes_from_its_file_first(tmp_path: Path) -> None:
    (tmp_path / "api.token").write_text("from-the-file\n")
    env = {env_name("api.token"): "from-the-env"}
    credential = resolve("api.token", tmp_path, env)
    assert credential.name == "api.token"
    assert credential.value == "from-the-file"
    assert credential.fields is None
    assert credential.secrets == ("from-the-file",)


def test_a_credential_without_a_file_comes_from_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert env_name("pg-main.read") == "SLUICE_CREDENTIAL_PG_MAIN_READ"
    monkeypatch.setenv("SLUICE_CREDENTIAL_PG_MAIN_READ", "from-the-env")
    assert resolve("pg-main.read", tmp_path).value == "from-the-env"
    assert resolve("pg-main.read", None).value == "from-the-env"


def test_every_string_of_a_json_credential_is_a_secret() -> None:
    value = orjson.dumps(
        {"user": "alice", "password": "s3cret-pw", "port": 5432, "more": {"k": ["deep-one"]}}
    ).decode()
    credential = resolve("pg", None, {"SLUICE_CREDENTIAL_PG": value})
    assert credential.fields is not None
    assert credential.fields["port"] == 5432
    assert set(credential.secrets) == {value, "alice", "s3cret-pw", "deep-one"}


@pytest.mark.parametrize(
    ("dsn", "password"),
    [
        ("postgresql://u:pw-secret@db.example/app", "pw-secret"),
        ("postgresql://u:p%40ss-word@db.example/app", "p@ss-word"),
        ("host=db.example password=hunter22 dbname=app", "hunter22"),
        ("host=db.example password='two words' dbname=app", "two words"),
    ],
)
def test_the_password_of_a_dsn_is_a_secret(dsn: str, password: str) -> None:
    credential = resolve("pg", None, {"SLUICE_CREDENTIAL_PG": dsn})
    assert dsn in credential.secrets
    assert password in credential.secrets
    assert (
        redact(f"login failed with {password}", credential.secrets) == f"login failed with {MASK}"
    )


def test_the_password_of_a_uri_given_as_a_parameter_is_a_secret() -> None:
    dsn = "postgresql://u@db.example/app?password=hunter22&sslmode=require"
    credential = resolve("pg", None, {"SLUICE_CREDENTIAL_PG": dsn})
    assert redact("login failed with hunter22", credential.secrets) == f"login failed with {MASK}"


@pytest.mark.parametrize("name", ["../secret", "", ".secret", "a/b", "x" * 129, 7, None])
def test_a_bad_name_is_refused_without_reading_anything(tmp_path: Path, name: Any) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (tmp_path / "secret").write_text("top-secret-value")
    (creds / "secret").write_text("top-secret-value")
    with pytest.raises(CredentialError) as failed:
        resolve(name, creds, {"SLUICE_CREDENTIAL_": "top-secret-value"})
    assert "is not a credential name" in str(failed.value)
    assert "top-secret-value" not in str(failed.value)


def test_a_missing_credential_names_where_it_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(CredentialError) as failed:
        resolve("nope", tmp_path, {})
    assert "'nope'" in str(failed.value)
    assert str(tmp_path / "nope") in str(failed.value)
    assert "SLUICE_CREDENTIAL_NOPE" in str(failed.value)


def test_an_empty_credential_is_missing(tmp_path: Path) -> None:
    (tmp_path / "blank").write_text("  \n")
    with pytest.raises(CredentialError, match="no credential 'blank'"):
        resolve("blank", tmp_path, {})


def test_a_credential_that_is_broken_json_is_refused_without_its_value(tmp_path: Path) -> None:
    (tmp_path / "broken").write_text('{"password": "top-secret-value"')
    with pytest.raises(CredentialError) as failed:
        resolve("broken", tmp_path, {})
    assert "not JSON" in str(failed.value)
    assert "top-secret-value" not in str(failed.value)


def test_a_credential_file_that_cannot_be_read_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(CredentialError, match="cannot be read"):
        resolve("adir", tmp_path, {"SLUICE_CREDENTIAL_ADIR": "from-the-env"})


def test_redact_replaces_secrets_in_nested_values_and_keys() -> None:
    value = {
        "top": "a s3cret-pw b",
        "list": ["s3cret-pw", {"deep": ("x", "s3cret-pw-longer")}],
        "key-s3cret-pw": 1,
        "number": 5432,
        "none": None,
    }
    assert redact(value, ["s3cret-pw", "s3cret-pw-longer"]) == {
        "top": f"a {MASK} b",
        "list": [MASK, {"deep": ["x", MASK]}],
        f"key-{MASK}": 1,
        "number": 5432,
        "none": None,
    }


def test_redact_leaves_short_secrets_and_values_without_secrets_alone() -> None:
    value = {"word": "the cat sat", "n": [1, "abc"]}
    assert redact(value, ["cat", "abc", ""]) == value
    assert redact("no secret here", ["s3cret-pw"]) == "no secret here"
    assert redact("abcd", ["abcd"]) == MASK


# --- postgres ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """One local PostgreSQL server (trust authentication) for this module's tests."""
    try:
        postgres_bin_dir()
    except ProcessError:
        ensure_packages(("postgresql",))
    # Not under tmp_path: the server runs as the package's user, which may not enter it.
    with postgres_server(root=BASE_DIR / f"unit-workflow-tools-{os.getpid()}") as running:
        with psycopg.connect(running.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        yield running


# A database of its own: every string of a JSON credential is a secret, and "postgres"
# (the word) would be masked in every message.
DATABASE = "tools_db"


def _table() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


async def test_postgres_runs_each_statement_with_an_env_credential(
    pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_CREDENTIAL_PG", pg.dsn)
    table = _table()
    tool = {
        "kind": "postgres",
        "auth": "pg",
        "query": f"CREATE TABLE {table}(a int); INSERT INTO {table} VALUES (1),(2);"
        f" SELECT a FROM {table} ORDER BY a",
    }
    result = await run_tool(tool, 10, _settings(), OPEN)
    assert set(result) == {"command_0", "command_1", "command_2"}
    assert result["command_2"] == {
        "rows": [{"a": 1}, {"a": 2}],
        "row_count": 2,
        "columns": ["a"],
    }
    assert result["command_1"]["row_count"] == 2
    assert result["command_0"]["rows"] == []


async def test_postgres_values_become_plain_json(
    pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_CREDENTIAL_PG", pg.dsn)
    query = (
        "SELECT 1.50::numeric AS n, DATE '2024-02-29' AS d, '\\x0aff'::bytea AS b,"
        " '00000000-0000-0000-0000-000000000001'::uuid AS u, '{\"k\": [1]}'::jsonb AS j"
    )
    result = await run_tool(
        {"kind": "postgres", "auth": "pg", "query": query}, 10, _settings(), OPEN
    )
    assert result["command_0"]["rows"] == [
        {
            "n": "1.50",
            "d": "2024-02-29",
            "b": "0aff",
            "u": "00000000-0000-0000-0000-000000000001",
            "j": {"k": [1]},
        }
    ]


async def test_a_postgres_error_fails_the_step_naming_it(
    pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_CREDENTIAL_PG", pg.dsn)
    tool = {"kind": "postgres", "auth": "pg", "query": "SELECT * FROM no_such_table"}
    with pytest.raises(ToolFailed) as failed:
        await run_tool(tool, 10, _settings(), OPEN)
    assert failed.value.message.startswith("postgres: ")
    assert "no_such_table" in failed.value.message


async def test_the_password_of_a_postgres_credential_is_redacted_from_results_and_errors(
    pg: PostgresServer, tmp_path: Path
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    # Connection parameters as a JSON object (`database` for `dbname`); the server trusts
    # 127.0.0.1, so the password is sent and ignored: here it only has to stay out of sight.
    fields = {
        "host": "127.0.0.1",
        "port": pg.port,
        "user": pg.user,
        "database": DATABASE,
        "password": password,
    }
    (tmp_path / "pg").write_text(orjson.dumps(fields).decode())
    settings = _settings(credentials_dir=tmp_path)
    query = f"SELECT 'the password is {password}' AS leaked, 6 * 7 AS n"
    result = await run_tool({"kind": "postgres", "auth": "pg", "query": query}, 10, settings, OPEN)
    # Every string of the object is a secret (the user, host and database too).
    assert result["command_0"]["rows"] == [{"leaked": f"the password is {MASK}", "n": 42}]
    with pytest.raises(ToolFailed) as failed:
        await run_tool(
            {"kind": "postgres", "auth": "pg", "query": f"SELECT '{password}'::int"},
            10,
            settings,
            OPEN,
        )
    assert failed.value.message.startswith("postgres: ")
    assert MASK in failed.value.message
    assert password not in str(failed.value)
    assert password not in orjson.dumps(failed.value.output).decode()


async def test_a_postgres_statement_over_the_timeout_is_cancelled(
    pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_CREDENTIAL_PG", pg.dsn)
    tool = {"kind": "postgres", "auth": "pg", "query": "SELECT pg_sleep(30)"}
    started = time.monotonic()
    with pytest.raises(ToolFailed, match="statement timeout"):
        await run_tool(tool, 1, _settings(), OPEN)
    assert time.monotonic() - started < 4


async def test_a_postgres_step_needs_a_credential() -> None:
    with pytest.raises(ToolFailed, match="needs auth"):
        await run_tool({"kind": "postgres", "query": "SELECT 1"}, 5, _settings(), OPEN)
