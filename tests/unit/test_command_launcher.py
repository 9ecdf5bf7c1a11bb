"""The command executor's spawn server (`sluice-launch --serve`) with real programs and no
broker: a job's limits, user and directory reach its program, what it leaves in its
directory goes, a dead spawn server fails the attempt for a retry and takes the job's
program with it, and the next job starts a new one."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.jobs.command import CommandCall, CommandFailed
from connectors.jobs.executor import JobContext
from connectors.jobs.launcher import LauncherGone
from core.config import CommandExecutor
from core.settings import JobSettings

SH = "/bin/sh"


def _call(tmp_path: Path, script: str, **executor: Any) -> CommandCall:
    settings = JobSettings(commands=("/bin", "/usr/bin"), work_dir=tmp_path / "work")
    spec = CommandExecutor(type="command", argv=(SH, "-c", script), **executor)
    return CommandCall(spec, settings, "q")


def _context(n: int = 1) -> JobContext:
    return JobContext(id=f"job-{n}", queue="q", attempt=1, max_attempts=3, priority=0, tags=())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _exists(path: str | Path) -> bool:
    return Path(path).exists()


def _entries(path: Path) -> list[Path]:
    return list(path.iterdir())


REPORT = (
    'printf \'{"files": "%s", "uid": %s, "gid": %s, "cwd": "%s", "home": "%s"}\''
    ' "$(ulimit -n)" "$(id -u)" "$(id -g)" "$(pwd)" "$HOME"'
)


async def test_the_limits_user_and_directory_of_a_job_reach_its_program(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    call = _call(tmp_path, REPORT, limits={"open_files": 77}, user="nobody")
    try:
        if os.geteuid() != 0:
            # Only root may switch users: the job fails with the reason, the worker lives on.
            with pytest.raises(CommandFailed, match=r"setgroups|setgid|setuid"):
                await call(None, _context())
            return
        report = await call(None, _context())
    finally:
        await call.close()
    assert report["files"] == "77"
    assert (report["uid"], report["gid"]) == (nobody.pw_uid, nobody.pw_gid)
    work = Path(report["cwd"])
    assert work.parent == tmp_path / "work"
    assert report["home"] == str(work)
    assert not _exists(work)  # removed after the job


async def test_what_a_job_leaves_in_its_directory_is_removed(tmp_path: Path) -> None:
    script = 'mkdir -p a/b && echo data > a/b/file && echo x > top && printf \'"%s"\' "$(pwd)"'
    call = _call(tmp_path, script)
    try:
        first, second = await asyncio.gather(call(None, _context(1)), call(None, _context(2)))
    finally:
        await call.close()
    assert first != second  # a directory of its own each
    assert not _exists(first)
    assert not _exists(second)
    assert _entries(tmp_path / "work") == []


async def test_a_dead_spawn_server_fails_the_attempt_for_a_retry_and_its_job_dies_too(
    tmp_path: Path,
) -> None:
    pid_file, done = tmp_path / "pid", tmp_path / "done"
    script = f"if [ -e {done} ]; then echo 42; else echo $$ > {pid_file}; exec sleep 60; fi"
    call = _call(tmp_path, script)
    try:
        running = asyncio.create_task(call(None, _context(1)))
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the job never started"
            await asyncio.sleep(0.02)
        job = int(pid_file.read_text())
        server = call.launcher.proc
        assert server is not None
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(LauncherGone):
            await asyncio.wait_for(running, 5)
        deadline = time.monotonic() + 2
        while _alive(job):
            assert time.monotonic() < deadline, "the job outlived its spawn server"
            await asyncio.sleep(0.02)
        # The next job gets a new server.
        done.touch()
        assert await call(None, _context(2)) == 42
        assert call.launcher.proc is not None
        assert call.launcher.proc.pid != server.pid
    finally:
        await call.close()


async def test_a_closed_executor_kills_the_jobs_it_still_runs(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    call = _call(tmp_path, f"echo $$ > {pid_file}; exec sleep 60")
    running = asyncio.create_task(call(None, _context(1)))
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the job never started"
        await asyncio.sleep(0.02)
    job = int(pid_file.read_text())
    await call.close()
    with pytest.raises(LauncherGone):
        await asyncio.wait_for(running, 5)
    assert not _alive(job)


async def test_a_job_past_its_cpu_time_limit_is_killed_with_the_reason(tmp_path: Path) -> None:
    call = _call(tmp_path, "while :; do :; done", limits={"cpu_s": 1})
    started = time.monotonic()
    try:
        with pytest.raises(CommandFailed, match=r"killed by SIGXCPU.*CPU time limit 1 s"):
            await asyncio.wait_for(call(None, _context()), 15)
    finally:
        await call.close()
    assert time.monotonic() - started < 10


async def test_a_job_cannot_start_more_processes_than_its_limit(tmp_path: Path) -> None:
    # RLIMIT_NPROC counts the processes of the job's user, and binds root only through
    # another user: the job runs as nobody (as root; otherwise the switch itself fails).
    script = "sleep 5 & sleep 5 & sleep 5 & wait; echo 1"
    call = _call(tmp_path, script, limits={"processes": 2}, user="nobody")
    started = time.monotonic()
    try:
        reason = r"Cannot fork" if os.geteuid() == 0 else r"setgroups|setgid|setuid"
        with pytest.raises(CommandFailed, match=reason):
            await asyncio.wait_for(call(None, _context()), 15)
    finally:
        await call.close()
    assert time.monotonic() - started < 5  # failed at the fork, not after the sleeps
