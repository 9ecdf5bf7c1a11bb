"""The command executor's side of `sluice-launch`, its spawn server.

A job worker starts one `sluice-launch --serve` for each queue of the command executor
and asks it over a socket to start a job's program (with the job's pipes, directory,
environment, limits and user) and to signal the job's process group; it answers when
the program started and when it exited. The worker itself never forks: its event loop
goes on while the server forks and the program execs, on the other core. The protocol
is in connectors/jobs/launch/sluice-launch.c.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from connectors.jobs.executor import Retry
from core.errors import ConfigError

log = structlog.get_logger("sluice.jobs.launcher")

LAUNCHER = "sluice-launch"
SPAWN, SIGNAL = 1, 2
STARTED, EXITED = 1, 2
# struct request and struct reply of sluice-launch.c (packed, native byte order).
REQUEST = struct.Struct("=IIIiQqqqqii")
REPLY = struct.Struct("=Qiiii")
MAX_REQUEST = 256 * 1024
# How long a closing worker waits for its server to kill and reap the jobs left.
CLOSE_WAIT_S = 5.0


class LauncherGone(Retry):
    """The spawn server died (and the job's program with it): the attempt is retried."""


def launcher() -> str:
    """`sluice-launch` (built by `make install` next to the Python that runs Sluice)."""
    beside = Path(sys.executable).parent / LAUNCHER
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(LAUNCHER)
    if found is None:
        raise ConfigError(f"the command executor needs {LAUNCHER} (built by make install)")
    return found


@dataclass(frozen=True)
class Limits:
    """What a job's process gets (None: the worker's own)."""

    cpu_s: int | None = None
    memory_bytes: int | None = None
    open_files: int | None = None
    processes: int | None = None
    uid: int | None = None
    gid: int | None = None

    def packed(self) -> tuple[int, ...]:
        """As struct request has them (-1: none)."""
        found = (self.cpu_s, self.memory_bytes, self.open_files, self.processes)
        return (
            *(-1 if value is None else value for value in found),
            -1 if self.uid is None else self.uid,
            -1 if self.gid is None else self.gid,
        )


@dataclass
class Child:
    """A job's program, as the server reports it."""

    tag: int
    started: asyncio.Future[int]
    # Its exit code (negative: the signal) and whether its directory was left (not empty).
    exited: asyncio.Future[tuple[int, bool]]
    pid: int = field(default=0)


class Launcher:
    """One spawn server and the jobs it runs."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or launcher()
        self.tags = itertools.count(1)
        self.children: dict[int, Child] = {}
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(  # noqa: S603 -- our own program, no shell
                [self.path, "--serve", str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(ours.fileno(), self._replies)
        self.sock = ours
        log.debug("spawn server started", pid=self.proc.pid)
        return ours

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        work_dir: str,
        limits: Limits,
        fds: tuple[int, int, int],
    ) -> Child:
        """Have the server start `argv` in `work_dir` (which it creates) with `fds` as its
        stdin, stdout and stderr (the caller still owns and closes them)."""
        sock = self.sock or self._start()
        assert self.loop is not None
        strings = [work_dir, *argv, *(f"{name}={value}" for name, value in env.items())]
        body = b"".join(os.fsencode(text) + b"\0" for text in strings)
        tag = next(self.tags)
        head = REQUEST.pack(SPAWN, len(argv), len(env), 0, tag, *limits.packed())
        if len(head) + len(body) > MAX_REQUEST:
            raise ConfigError(f"a job's command line and environment exceed {MAX_REQUEST} bytes")
        child = Child(tag, self.loop.create_future(), self.loop.create_future())
        self.children[tag] = child
        try:
            sock.sendmsg(
                [head, body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
        except OSError as exc:
            del self.children[tag]
            self._gone(f"the spawn server is gone ({exc})")
            raise LauncherGone("the job's spawn server is gone") from None
        return child

    def signal(self, child: Child, sig: int) -> None:
        """`sig` to the job's process group, unless its program was reaped already."""
        if self.sock is None or child.exited.done():
            return
        try:
            self.sock.send(REQUEST.pack(SIGNAL, 0, 0, sig, child.tag, *Limits().packed()))
        except OSError as exc:
            self._gone(f"the spawn server is gone ({exc})")

    def _replies(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(REPLY.size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self._gone(f"the spawn server is gone ({exc})")
                return
            if not data:
                self._gone("the spawn server exited")
                return
            tag, kind, pid, status, error = REPLY.unpack(data)
            child = self.children.get(tag)
            if child is None:
                continue
            if kind == STARTED:
                if error:
                    del self.children[tag]
                    why = f"the job could not be started: {os.strerror(error)}"
                    _fail(child, Retry(why))
                else:
                    child.pid = pid
                    child.started.set_result(pid)
            elif kind == EXITED:
                del self.children[tag]
                child.exited.set_result((os.waitstatus_to_exitcode(status), bool(error)))

    def _gone(self, why: str) -> None:
        """The server died: its jobs were SIGKILLed with it; the next job starts a new one."""
        if self.sock is None:
            return
        log.warning("spawn server lost", reason=why, jobs=len(self.children))
        assert self.loop is not None
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        children, self.children = self.children, {}
        for child in children.values():
            _fail(child, LauncherGone(why))

    async def close(self) -> None:
        """Stop the server; the jobs it still runs are killed with their groups."""
        if self.sock is None or self.loop is None:
            return
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        children, self.children = self.children, {}
        for child in children.values():
            _fail(child, LauncherGone("the worker stopped"))


def _fail(child: Child, exc: Exception) -> None:
    """The child's futures not done yet end with `exc` (marked retrieved: whoever awaits
    them still gets it, and one nobody awaits is not reported as lost)."""
    for future in (child.started, child.exited):
        if not future.done():
            future.set_exception(exc)
            future.exception()
