"""A local single-node Apache Kafka broker (KRaft) from the official jars on Maven Central.

`ensure_jars` resolves `org.apache.kafka:kafka_<scala>:<version>` with Maven into a cache
outside the project, `start_broker` formats the storage once and starts broker and
controller in one JVM on 127.0.0.1, `stop_broker` stops it gracefully.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from rich.console import Console

from core.settings import BrokerSettings
from ops.errors import BrokerError
from ops.processes import alive, spawn_detached

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.sluice</groupId>
  <artifactId>local-kafka</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{version}</version>
    </dependency>
{extra}
  </dependencies>
</project>
"""
_DEP = """    <dependency>
      <groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version>
    </dependency>"""


def _major(settings: BrokerSettings) -> int:
    return int(settings.version.split(".")[0])


def _logging_deps(settings: BrokerSettings) -> list[tuple[str, str, str]]:
    # Kafka 3.x logs through reload4j behind slf4j 1.7; Kafka 4 moved to log4j2 + slf4j 2.
    if _major(settings) >= 4:
        return [
            ("org.apache.logging.log4j", "log4j-slf4j2-impl", "2.24.3"),
            ("org.apache.logging.log4j", "log4j-core", "2.24.3"),
        ]
    return [("org.slf4j", "slf4j-reload4j", "1.7.36")]


def jar_dir(settings: BrokerSettings) -> Path:
    """Where the resolved jars of the configured version live."""
    return settings.cache_dir.expanduser() / f"{settings.scala_version}-{settings.version}" / "libs"


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(hint)
    return path


def ensure_jars(settings: BrokerSettings, console: Console | None = None) -> Path:
    """Resolve the broker's jars with Maven once; later calls use the cache."""
    libs = jar_dir(settings)
    marker = libs.parent / "complete"
    if marker.exists():
        return libs
    mvn = _require(
        "mvn",
        "Maven is required to fetch the Kafka jars: install Maven 3 (Debian: apt-get install maven)",
    )
    libs.parent.mkdir(parents=True, exist_ok=True)
    extra = "\n".join(_DEP.format(g=g, a=a, v=v) for g, a, v in _logging_deps(settings))
    pom = libs.parent / "pom.xml"
    pom.write_text(_POM.format(scala=settings.scala_version, version=settings.version, extra=extra))
    log = libs.parent / "maven.log"
    cmd = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}",
        "-DincludeScope=runtime",
    ]
    status = f"resolving Apache Kafka {settings.version} jars from Maven Central (once, ~50 MB) ..."
    with (console or Console(stderr=True)).status(status), log.open("wb") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)  # noqa: S603
    if done.returncode != 0:
        raise BrokerError(
            f"Maven could not resolve Kafka {settings.version} (exit {done.returncode}); see {log}"
        )
    marker.write_text(settings.version)
    return libs


def _state(settings: BrokerSettings) -> Path:
    return settings.state_dir.expanduser().resolve()


def server_properties(settings: BrokerSettings) -> str:
    """The broker+controller configuration of the local single node."""
    state = _state(settings)
    host = settings.host
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{host}:{settings.controller_port}",
            f"listeners=PLAINTEXT://{host}:{settings.port},CONTROLLER://{host}:{settings.controller_port}",
            f"advertised.listeners=PLAINTEXT://{host}:{settings.port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={state / 'data'}",
            "num.partitions=4",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "",
        ]
    )


def _log_config(settings: BrokerSettings) -> tuple[str, str]:
    state = _state(settings)
    if _major(settings) >= 4:
        text = f"""Configuration:
  Appenders:
    File:
      name: file
      fileName: "{state / "broker.log"}"
      PatternLayout: {{pattern: "[%d] %p %m (%c)%n"}}
  Loggers:
    Root: {{level: INFO, AppenderRef: [{{ref: file}}]}}
"""
        return "log4j2.yaml", text
    text = f"""log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={state / "broker.log"}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
"""
    return "log4j.properties", text


def _java_args(settings: BrokerSettings, libs: Path) -> list[str]:
    java = _require(
        "java",
        "Java 17+ is required to run the Kafka broker: install a JDK (Debian: apt-get install openjdk-17-jre-headless)",
    )
    name, _ = _log_config(settings)
    log_prop = "log4j2.configurationFile" if _major(settings) >= 4 else "log4j.configuration"
    return [
        java,
        f"-Xmx{settings.heap}",
        f"-Xms{settings.heap}",
        "-XX:+UseG1GC",
        f"-D{log_prop}=file:{_state(settings) / name}",
        "-cp",
        f"{libs}/*",
    ]


def _pid_file(settings: BrokerSettings) -> Path:
    return _state(settings) / "broker.pid"


def broker_pid(settings: BrokerSettings) -> int | None:
    """The pid of the broker this state folder belongs to, if it runs."""
    try:
        pid = int(_pid_file(settings).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        _pid_file(settings).unlink(missing_ok=True)
        return None
    return pid


def wait_for_broker(bootstrap: str, timeout: float) -> bool:
    """Whether a broker at `bootstrap` answers a metadata request within `timeout` seconds."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            return True
        except KafkaException:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def bootstrap(settings: BrokerSettings) -> str:
    """The client address of the local broker."""
    return f"{settings.host}:{settings.port}"


def new_cluster_id() -> str:
    """A random KRaft cluster id, never starting with '-' (the format tool would read an option)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def start_broker(settings: BrokerSettings, console: Console | None = None) -> int:
    """Start the broker unless it runs; returns its pid once it answers metadata requests."""
    console = console or Console(stderr=True)
    running = broker_pid(settings)
    if running is not None and wait_for_broker(bootstrap(settings), 5):
        console.print(f"kafka    already running, pid {running}, {bootstrap(settings)}")
        return running
    libs = ensure_jars(settings, console)
    java = _java_args(settings, libs)
    state = _state(settings)
    state.mkdir(parents=True, exist_ok=True)
    props = state / "server.properties"
    props.write_text(server_properties(settings))
    name, text = _log_config(settings)
    (state / name).write_text(text)
    if not (state / "data" / "meta.properties").exists():
        cluster_id = new_cluster_id()
        fmt = subprocess.run(  # noqa: S603
            [*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise BrokerError(
                f"formatting Kafka storage failed: {(fmt.stderr or fmt.stdout).strip()[-300:]}"
            )
    pid = spawn_detached([*java, "kafka.Kafka", str(props)], state / "broker.out")
    _pid_file(settings).write_text(str(pid))
    starting = f"starting Kafka {settings.version} on {bootstrap(settings)}"
    with console.status(f"{starting} ...") as status:
        deadline = time.monotonic() + settings.start_timeout_s
        recovered: tuple[int, int] | None = None
        while time.monotonic() < deadline:
            if not alive(pid):
                _pid_file(settings).unlink(missing_ok=True)
                raise BrokerError(f"the broker exited: {_last_error(state)}")
            progress = log_recovery(state / "broker.log")
            if progress is not None and progress != recovered:
                # Loading many partitions after an unclean stop takes a while: as long as it
                # moves, the wait goes on, and the operator sees how far it got.
                recovered = progress
                deadline = time.monotonic() + settings.start_timeout_s
                status.update(f"{starting}: loading logs, {progress[0]}/{progress[1]} partitions")
            if wait_for_broker(bootstrap(settings), 1.0):
                console.print(
                    f"kafka    running, pid {pid}, {bootstrap(settings)}, log {state / 'broker.log'}"
                )
                return pid
    stop_broker(settings, console)
    raise BrokerError(
        f"the broker did not answer within {settings.start_timeout_s:.0f}s; see {state / 'broker.log'}"
    )


_RECOVERY = re.compile(rb"\((\d+)/(\d+) completed in ")


def log_recovery(log: Path) -> tuple[int, int] | None:
    """How many of its partitions the starting broker has loaded, from the end of its log."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            tail = f.read()
    except OSError:
        return None
    found = _RECOVERY.findall(tail)
    if not found:
        return None
    done, total = found[-1]
    return int(done), int(total)


def _last_error(state: Path) -> str:
    for name in ("broker.out", "broker.log"):
        try:
            lines = (state / name).read_text("utf-8", "replace").splitlines()
        except OSError:
            continue
        errors = [ln for ln in lines if "ERROR" in ln or "Exception" in ln]
        if errors:
            return errors[-1].strip()[:300]
    return f"see {state / 'broker.log'}"


def stop_broker(
    settings: BrokerSettings, console: Console | None = None, timeout: float = 30.0
) -> bool:
    """SIGTERM the broker and wait (SIGKILL after `timeout`); False when it was not running."""
    console = console or Console(stderr=True)
    pid = broker_pid(settings)
    if pid is None:
        console.print("kafka    was not running")
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    if alive(pid):
        os.killpg(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.1)
    _pid_file(settings).unlink(missing_ok=True)
    console.print(f"kafka    stopped (pid {pid})")
    return True


def broker_status(settings: BrokerSettings) -> tuple[int | None, int | None]:
    """(pid, number of topics) of the local broker; (None, None) when it is not running."""
    pid = broker_pid(settings)
    if pid is None:
        return None, None
    admin = AdminClient({"bootstrap.servers": bootstrap(settings), "log_level": 0})
    try:
        return pid, len(admin.list_topics(timeout=5).topics)
    except KafkaException:
        return pid, None
