"""Redis and PostgreSQL for the baselines of `sluice bench jobs`, from Debian's packages.

`ensure_packages` installs `redis-server` and `postgresql` with apt-get when they are
missing (as root; elsewhere it names the packages to install). `redis_server()` and
`postgres_server()` run one server each as a process of this command, on 127.0.0.1 on a
free port (or the one given), with its data under `.sluice/baselines/`, and stop it when
the block ends. The Debian packages' own system services are never started or used.

Redis runs as the current user. PostgreSQL refuses to run as root: under root its data
directory is given to the `postgres` user the package creates, and the server runs as it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ops.errors import ProcessError

BASE_DIR = Path(".sluice") / "baselines"
# Debian package -> what shows that it is there.
PACKAGES = {"redis-server": "/usr/bin/redis-server", "postgresql": "/usr/lib/postgresql"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _installed(package: str) -> bool:
    try:
        out = subprocess.run(  # noqa: S603 - a fixed argv and a package name of ours
            ["dpkg-query", "-W", "-f=${Status}", package],  # noqa: S607 - Debian's own tool
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return False
    return out.returncode == 0 and "install ok installed" in out.stdout


def ensure_packages(packages: tuple[str, ...] = tuple(PACKAGES)) -> list[str]:
    """Install the Debian packages among `packages` that are missing; returns those installed.

    Fails (ProcessError, one line) without apt-get, without root, or when apt-get fails.
    """
    missing = [p for p in packages if not _installed(p) or not Path(PACKAGES[p]).exists()]
    if not missing:
        return []
    names = " ".join(missing)
    if shutil.which("apt-get") is None:
        raise ProcessError(f"the baselines need the Debian packages {names}; apt-get is missing")
    if os.geteuid() != 0:
        raise ProcessError(f"the baselines need {names}: run `sudo apt-get install {names}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)  # noqa: S603
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["?"]
            raise ProcessError(f"`{' '.join(argv)}` failed: {last[0]}")
    return missing


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if proc.poll() is not None:
            lines = log.read_text("utf-8", "replace").strip().splitlines() or ["?"]
            # The reason, where the log names one (PostgreSQL logs its shutdown after it).
            reasons = [x for x in lines if "FATAL" in x or "ERROR" in x or " # " in x]
            raise ProcessError(f"{name} exited with {proc.returncode}: {(reasons or lines)[-1]}")
        if time.monotonic() > deadline:
            raise ProcessError(f"{name} did not answer within 60 s; see {log}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server."""

    port: int
    data_dir: Path

    def ping(self) -> bool:
        """Whether it answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@contextmanager
def redis_server(port: int = 0, root: Path = BASE_DIR) -> Iterator[RedisServer]:
    """Debian's redis-server on 127.0.0.1 (AOF on, fsync every second, no RDB snapshots),
    its data in a fresh `root/redis`; stopped (SIGTERM: a clean shutdown) afterwards."""
    data = (root / "redis").resolve()
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    server = RedisServer(port or free_port(), data)
    log = data / "redis.log"
    log.touch()
    argv = [
        PACKAGES["redis-server"],
        "--port", str(server.port),
        "--bind", "127.0.0.1",
        "--dir", str(data),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--logfile", str(log),
    ]  # fmt: skip
    proc = subprocess.Popen(  # noqa: S603 - our own argv
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait(server.ping, proc, "redis-server", log)
        yield server
    finally:
        _stop(proc, signal.SIGTERM)


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL server: connect as `user` to database `postgres`."""

    port: int
    data_dir: Path
    bin_dir: Path
    user: str = "sluice"

    @property
    def dsn(self) -> str:
        """A libpq connection string for it."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres"

    def ready(self) -> bool:
        """Whether it accepts connections (pg_isready)."""
        done = subprocess.run(  # noqa: S603 - the package's own tool
            [str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
        )
        return done.returncode == 0


def postgres_bin_dir() -> Path:
    """The bin directory of the newest PostgreSQL that Debian's packages installed."""
    found = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise ProcessError("no PostgreSQL server under /usr/lib/postgresql (Debian's postgresql)")
    return found[-1]


@contextmanager
def postgres_server(port: int = 0, root: Path = BASE_DIR) -> Iterator[PostgresServer]:
    """Debian's PostgreSQL on 127.0.0.1 (`synchronous_commit=on`, fsync on), a fresh cluster
    in `root/postgres`; stopped (SIGINT: a fast shutdown) afterwards."""
    bin_dir = postgres_bin_dir()
    base = (root / "postgres").resolve()
    shutil.rmtree(base, ignore_errors=True)
    data = base / "data"
    data.mkdir(parents=True)
    # Root may not run PostgreSQL: the package's `postgres` user does, owning the cluster.
    user = "postgres" if os.geteuid() == 0 else None
    if user is not None:
        shutil.chown(base, user)
        shutil.chown(data, user)
    server = PostgresServer(port or free_port(), data, bin_dir)
    log = base / "postgres.log"
    init = subprocess.run(  # noqa: S603 - the package's own tool
        [str(bin_dir / "initdb"), "-D", str(data), "-U", server.user, "-A", "trust", "-E", "UTF8"],
        capture_output=True,
        text=True,
        user=user,
        check=False,
    )
    if init.returncode != 0:
        last = init.stderr.strip().splitlines()[-1:] or ["?"]
        raise ProcessError(f"initdb failed: {last[0]}")
    argv = [
        str(bin_dir / "postgres"),
        "-D", str(data),
        "-p", str(server.port),
        "-c", "listen_addresses=127.0.0.1",
        "-c", f"unix_socket_directories={base}",
        "-c", "synchronous_commit=on",
        "-c", "fsync=on",
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own argv
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
        )
    try:
        _wait(server.ready, proc, "postgres", log)
        yield server
    finally:
        _stop(proc, signal.SIGINT)
