"""The command executor: a job runs as a program, under a JSON contract.

A queue's `executor: {type: command, argv: [...]}` names the program and its fixed
arguments. It is started without a shell, so nothing of a job reaches its command line;
only programs the worker is started to allow may be named (`SLUICE_JOBS_COMMANDS`).

The contract (the README has it with its JSON Schema):

- stdin: the job as one JSON document (`JobContext.document`: id, queue, attempt,
  max_attempts, priority, tags, deadline_ms, payload);
- stdout: the result, one JSON document (empty: null);
- stderr: lines `{"progress": 0.4, "message": "..."}` are progress, which reaches the
  job's status; any other line is the job's log (the executor logs it, and the last
  lines are the error of a failed attempt);
- exit 0: COMPLETED; 75 (EX_TEMPFAIL): the attempt failed, retried with the queue's
  backoff; any other exit, death by a signal, a stdout that is not JSON, or more
  stdout or stderr than the executor's bound: the job failed, DEAD without retry.

Each attempt gets a working directory of its own (removed afterwards), only the
environment variables its executor allows, a process group of its own and the limits
of its executor. The program is started by the queue's spawn server, `sluice-launch`
(connectors/jobs/launch/, built by `make install`; connectors/jobs/launcher.py): it sets
all that in the job's process before the exec, and has the kernel SIGKILL the job when
the executor dies, so a job never outlives a killed executor and its rerun after the
lease never overlaps it. The worker itself never forks (a fork of a large Python process
holds its event loop; `preexec_fn` is ten times slower still). At its timeout, or when
the job is cancelled, the whole group gets SIGTERM, then SIGKILL after `grace_s`: the
job's children and grandchildren end with it. When the program exits, whatever of its
group still runs is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import signal
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import structlog

from connectors.jobs.executor import Fatal, JobContext, Retry
from connectors.jobs.launcher import Child, Launcher, Limits
from connectors.jobs.metrics import JobMetrics
from core.config import CommandExecutor
from core.errors import ConfigError
from core.jobs import MAX_TEXT
from core.settings import JobSettings

log = structlog.get_logger("sluice.jobs.command")

EX_TEMPFAIL = 75
# What a read of a job's stdout or stderr takes at most at a time.
CHUNK = 64 * 1024
# The longest stderr line kept whole (longer ones are cut); the tail kept for the error.
MAX_LINE = 4096
TAIL_LINES = 20
# How long the executor waits for a job's pipes to close after its group was killed (a
# process that left the group may still hold them).
PIPE_WAIT_S = 1.0
# How often a running program's peak memory is read (a job that ends sooner has none).
SAMPLE_EVERY_S = 0.1


class CommandFailed(Fatal):
    """The program failed (an exit status other than 0 and 75, a signal, a bad stdout)."""


class OutputTooBig(CommandFailed):
    """The program wrote more to stdout or stderr than its executor's bound."""


def _user(name: str) -> tuple[int, int]:
    """The uid and gid of the user a job runs as (a name, or a number)."""
    try:
        found = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"command executor: no user {name!r}") from None
    return found.pw_uid, found.pw_gid


def _limits(executor: CommandExecutor) -> Limits:
    limits = executor.limits
    uid, gid = (None, None) if executor.user is None else _user(executor.user)
    return Limits(
        cpu_s=limits.cpu_s,
        memory_bytes=None if limits.memory_mb is None else limits.memory_mb * 1024 * 1024,
        open_files=limits.open_files,
        processes=limits.processes,
        uid=uid,
        gid=gid,
    )


class CommandCall:
    """A queue's program, checked once, run for each attempt."""

    with_context = True

    def __init__(
        self,
        executor: CommandExecutor,
        settings: JobSettings,
        queue: str,
        metrics: JobMetrics | None = None,
    ) -> None:
        program = shutil.which(executor.argv[0]) or executor.argv[0]
        path = Path(program).resolve()
        if not settings.allows_command(path):
            raise ConfigError(
                f"command {executor.argv[0]!r} ({path}) is not one this worker may run"
                " (SLUICE_JOBS_COMMANDS)"
            )
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ConfigError(f"command {executor.argv[0]!r}: {path} is not an executable file")
        self.executor = executor
        self.argv = [str(path), *executor.argv[1:]]
        self.limits = _limits(executor)
        self.queue = queue
        self.metrics = metrics
        self.launcher = Launcher()
        # A directory of the worker's own for the jobs' directories (a fresh one is cheap to
        # add to and remove from; the system's temporary directory may hold many entries).
        # Traversable by a job's user when it is another; each job's own is 0700, its own.
        base = settings.work_dir or Path(tempfile.gettempdir()) / "sluice-jobs"
        base.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.work_dir = str(base)
        # Names no other worker, and no earlier worker of the same pid, makes.
        prefix = f"job-{os.getpid()}-{secrets.token_hex(4)}"
        self.names = (f"{prefix}-{n}" for n in itertools.count())
        self.env = {name: os.environ[name] for name in executor.env if name in os.environ}

    async def close(self) -> None:
        """Stop the spawn server (the jobs it still runs are killed)."""
        await self.launcher.close()

    async def __call__(self, payload: Any, context: JobContext | None) -> Any:
        """Run the program for one attempt; its result, or the exception of its failure."""
        assert context is not None
        work_dir = os.path.join(self.work_dir, next(self.names))
        document = orjson.dumps(context.document(payload))
        env = {**self.env, "HOME": work_dir, "TMPDIR": work_dir, "SLUICE_JOB_ID": context.id}
        stdin, stdout, stderr = (os.pipe2(os.O_CLOEXEC) for _ in range(3))
        theirs = (stdin[0], stdout[1], stderr[1])
        try:
            child = self.launcher.spawn(self.argv, env, work_dir, self.limits, theirs)
        except BaseException:
            for fd in (stdin[1], stdout[0], stderr[0]):
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        left = True  # until the server says the directory went with the program
        try:
            code, out, err, peak_kb, left = await self._run(
                child, _Feed(stdin[1], document), stdout[0], stderr[0], context
            )
        finally:
            if left:
                await asyncio.to_thread(shutil.rmtree, work_dir, True)
        return self._outcome(code, out, err, peak_kb)

    async def _run(
        self, child: Child, feed: _Feed, stdout: int, stderr: int, context: JobContext
    ) -> tuple[int, _Capture, _Stderr, int, bool]:
        """Wait for the program's end (its timeout or cancel: its group killed); its exit
        code, stdout, stderr, peak memory, and whether its directory was left."""
        loop = asyncio.get_running_loop()
        feed.start(loop)
        executor = self.executor
        metrics = self.metrics
        if metrics is not None:
            metrics.processes.labels(self.queue).inc()
        exited = child.exited
        group = Group(self.launcher, child)
        out = _Capture(executor.max_stdout_bytes, group)
        err = _Stderr(executor.max_stderr_bytes, group, context, self.queue)
        pipes = (_Pipe(loop, stdout, out), _Pipe(loop, stderr, err))
        peak_kb = 0
        try:
            try:
                while not exited.done():
                    await asyncio.wait([exited], timeout=SAMPLE_EVERY_S)
                    if not exited.done() and child.pid:
                        peak_kb = max(peak_kb, _high_water_kb(child.pid))
            except asyncio.CancelledError:
                # The timeout or a cancel: the whole group goes, then the attempt ends.
                group.signal(signal.SIGTERM)
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(exited), executor.grace_s)
                raise
        finally:
            feed.close()
            try:
                if not exited.done():
                    group.signal(signal.SIGKILL)
                    await asyncio.wait([exited])
                if not all(pipe.done.done() for pipe in pipes):
                    await asyncio.wait([pipe.done for pipe in pipes], timeout=PIPE_WAIT_S)
            finally:
                for pipe in pipes:
                    pipe.close()
                if metrics is not None:
                    metrics.processes.labels(self.queue).dec()
                    if peak_kb:
                        metrics.peak_memory.labels(self.queue).observe(peak_kb * 1024)
        code, left = exited.result()  # the server's failure, or the attempt's end
        return code, out, err, peak_kb, left

    def _outcome(self, code: int, out: _Capture, err: _Stderr, peak_kb: int) -> Any:
        for capture, name in ((out, "stdout"), (err, "stderr")):
            if capture.over:
                raise OutputTooBig(f"the job wrote more than {capture.limit} bytes to {name}")
        if code == 0:
            text = bytes(out.data).strip()
            if not text:
                return None
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise CommandFailed(
                    f"the job's stdout is not one JSON document ({exc}): {_cut(text)}"
                ) from None
        tail = err.tail()
        if code == EX_TEMPFAIL:
            raise Retry(f"exit status 75 (retry): {tail}".rstrip(": "))
        what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        limits = self.executor.limits
        notes = [f"peak memory {peak_kb // 1024} MiB"] if peak_kb else []
        if limits.memory_mb is not None:
            notes.append(f"memory limit {limits.memory_mb} MiB")
        if limits.cpu_s is not None and code in (-signal.SIGXCPU, -signal.SIGKILL):
            notes.append(f"CPU time limit {limits.cpu_s} s")
        noted = f" ({', '.join(notes)})" if notes else ""
        raise CommandFailed(f"{what}{noted}: {tail}".rstrip(": "))


def _high_water_kb(pid: int) -> int:
    """The peak resident memory (KiB) of a running process, from /proc; 0 when gone.

    Its rusage would not do: a child started with vfork inherits its parent's peak.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cut(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= 200 else text[:200] + "..."


class _Feed:
    """The job's document written to its stdin without blocking, then stdin closed (a
    program that exits without reading it all is fine)."""

    def __init__(self, fd: int, data: bytes) -> None:
        self.fd = fd
        self.data = memoryview(data)
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write what the pipe takes now; the rest as it becomes writable."""
        os.set_blocking(self.fd, False)
        self.loop = loop
        if self._write():
            loop.add_writer(self.fd, self._more)

    def _write(self) -> bool:
        """Whether some is left to write."""
        try:
            while self.data:
                self.data = self.data[os.write(self.fd, self.data) :]
        except BlockingIOError:
            return True
        except OSError:  # the program closed its stdin, or exited
            self.data = memoryview(b"")
        self.close()
        return False

    def _more(self) -> None:
        self._write()  # all written: `close` stopped the writer

    def close(self) -> None:
        """Stop writing and close the pipe (once)."""
        if self.fd >= 0:
            if self.loop is not None:
                self.loop.remove_writer(self.fd)
            os.close(self.fd)
            self.fd = -1


class Group:
    """A job's process group, signalled through its spawn server."""

    def __init__(self, launcher: Launcher, child: Child) -> None:
        self.launcher = launcher
        self.child = child

    def signal(self, sig: int) -> None:
        """`sig` to every process of the group (its program reaped: nothing happens)."""
        self.launcher.signal(self.child, sig)


class _Pipe:
    """The read end of a job's stdout or stderr: what comes goes to `sink` as it comes
    (a reader on the loop, no task or transport a pipe); `done` at its end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, sink: _Capture) -> None:
        self.loop = loop
        self.fd = fd
        self.sink = sink
        self.done: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            while chunk := os.read(self.fd, CHUNK):
                self.sink.feed(chunk)
                if len(chunk) < CHUNK:
                    return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.close()  # the end: every process that held the write end is gone

    def close(self) -> None:
        """Stop reading and close the pipe (once)."""
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
            self.sink.end()
            if not self.done.done():
                self.done.set_result(None)


class _Capture:
    """A job's stdout, up to a bound: over it, the job's group is killed."""

    def __init__(self, limit: int, group: Group) -> None:
        self.limit = limit
        self.group = group
        self.data = bytearray()
        self.over = False

    def feed(self, chunk: bytes) -> None:
        """What the job wrote next."""
        if self.over:
            return  # read on (and drop) until the killed group's pipe closes
        if len(self.data) + len(chunk) > self.limit:
            self.over = True
            self.data.clear()
            self.group.signal(signal.SIGKILL)
            return
        self.data += chunk

    def end(self) -> None:
        """The job's end of the pipe is closed."""


class _Stderr(_Capture):
    """A job's stderr: progress lines to its status, other lines its log; bounded."""

    def __init__(self, limit: int, group: Group, context: JobContext, queue: str) -> None:
        super().__init__(limit, group)
        self.context = context
        self.queue = queue
        self.seen = 0
        self.partial = bytearray()
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)

    def feed(self, chunk: bytes) -> None:
        """What the job wrote next: its whole lines handled, the rest kept for later."""
        if self.over:
            return
        self.seen += len(chunk)
        if self.seen > self.limit:
            self.over = True
            self.group.signal(signal.SIGKILL)
            return
        self.partial += chunk
        *lines, rest = self.partial.split(b"\n")
        self.partial = bytearray(rest[:MAX_LINE])
        for line in lines:
            self._line(bytes(line[:MAX_LINE]))

    def end(self) -> None:
        """The last line, when it had no newline."""
        if self.partial and not self.over:
            self._line(bytes(self.partial))
        self.partial = bytearray()

    def _line(self, line: bytes) -> None:
        if line.startswith(b"{"):
            try:
                report = orjson.loads(line)
            except orjson.JSONDecodeError:
                report = None
            if isinstance(report, dict) and isinstance(
                progress := report.get("progress"), int | float
            ):
                message = report.get("message")
                self.context.progress(progress, None if message is None else str(message))
                return
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            self.lines.append(text)
            log.info("job log", queue=self.queue, job=self.context.id, line=text)

    def tail(self) -> str:
        """The last lines of the job's log, for the error of a failed attempt."""
        text = "\n".join(self.lines)
        return text[-(MAX_TEXT // 2) :]
