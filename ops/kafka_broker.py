"""Local Apache Kafka (KRaft) from the official jars on Maven Central: one node or a cluster.

`ensure_jars` resolves `org.apache.kafka:kafka_<scala>:<version>` with Maven into a cache
outside the project. `start_broker` formats each node's storage once (one cluster id for
all of them) and starts every node, each a broker and a controller in one JVM on
127.0.0.1; `stop_broker` stops them gracefully. One node (`SLUICE_BROKER_BROKERS=1`, the
default) listens on `port` and `controller_port` with its state in `state_dir`; node i of
a cluster on `port + 2(i-1)` and `controller_port + 2(i-1)`, its state in
`state_dir/node-<i>`, every node a voter of the controller quorum. `start_node` and
`kill_node` start and SIGKILL one node of a cluster (failover tests, rolling restarts).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from rich.console import Console

from core.acls import ROLES as ACL_ROLES
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


@dataclass(frozen=True)
class Node:
    """One node of the local cluster: its id, its client and controller ports, its folder."""

    node_id: int
    host: str
    port: int
    controller_port: int
    state: Path

    @property
    def address(self) -> str:
        """Its client address."""
        return f"{self.host}:{self.port}"


def nodes(settings: BrokerSettings) -> list[Node]:
    """Every node of the configured cluster (one: the single broker of `state_dir`)."""
    state = _state(settings)
    if settings.brokers == 1:
        return [Node(1, settings.host, settings.port, settings.controller_port, state)]
    found = [
        Node(
            i,
            settings.host,
            settings.port + 2 * (i - 1),
            settings.controller_port + 2 * (i - 1),
            state / f"node-{i}",
        )
        for i in range(1, settings.brokers + 1)
    ]
    ports = [p for n in found for p in (n.port, n.controller_port)]
    if len(set(ports)) != len(ports):
        raise BrokerError(
            f"the ports of {settings.brokers} nodes overlap: node i takes port + 2(i-1) and"
            " controller_port + 2(i-1) (SLUICE_BROKER_PORT, SLUICE_BROKER_CONTROLLER_PORT)"
        )
    return found


def _node(settings: BrokerSettings, node_id: int) -> Node:
    for node in nodes(settings):
        if node.node_id == node_id:
            return node
    raise BrokerError(
        f"no node {node_id}: the cluster has {settings.brokers} (1 to {settings.brokers})"
    )


def server_properties(settings: BrokerSettings, node_id: int = 1) -> str:
    """The broker+controller configuration of one node of the local cluster."""
    all_nodes = nodes(settings)
    node = _node(settings, node_id)
    host = settings.host
    size = len(all_nodes)
    # Kafka's own topics (offsets, transactions) replicated like Sluice's (`topics apply`).
    rf, isr = min(3, size), 2 if size >= 3 else 1
    voters = ",".join(f"{n.node_id}@{host}:{n.controller_port}" for n in all_nodes)
    return "\n".join(
        [
            "process.roles=broker,controller",
            f"node.id={node.node_id}",
            f"controller.quorum.voters={voters}",
            *_listener_properties(settings, node),
            f"log.dirs={node.state / 'data'}",
            "num.partitions=4",
            f"default.replication.factor={rf}",
            f"min.insync.replicas={isr}",
            f"offsets.topic.replication.factor={rf}",
            "offsets.topic.num.partitions=4",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={isr}",
            "transaction.state.log.num.partitions=4",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            # A node that comes back takes its partitions' leadership back soon.
            "leader.imbalance.check.interval.seconds=10",
            "",
        ]
    )


def _listener_properties(settings: BrokerSettings, node: Node) -> list[str]:
    host = settings.host
    listeners = [
        f"advertised.listeners={{}}://{host}:{node.port}",
        "controller.listener.names=CONTROLLER",
    ]
    if not sasl_enabled(settings):
        return [
            f"listeners=PLAINTEXT://{host}:{node.port},CONTROLLER://{host}:{node.controller_port}",
            listeners[0].format("PLAINTEXT"),
            listeners[1],
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        ]
    users = credentials(settings)
    scram = 'org.apache.kafka.common.security.scram.ScramLoginModule required username="{}" password="{}";'
    plain = 'org.apache.kafka.common.security.plain.PlainLoginModule required username="{0}" password="{1}" user_{0}="{1}";'
    return [
        f"listeners=SASL_PLAINTEXT://{host}:{node.port},CONTROLLER://{host}:{node.controller_port}",
        listeners[0].format("SASL_PLAINTEXT"),
        listeners[1],
        "inter.broker.listener.name=SASL_PLAINTEXT",
        "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
        # Clients and brokers: SCRAM users (made when the storage is formatted, more by the
        # admin later). Controllers talk PLAIN to each other: SCRAM needs the metadata log
        # they serve.
        f"sasl.enabled.mechanisms={MECHANISM}",
        f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
        f"listener.name.sasl_plaintext.{MECHANISM.lower()}.sasl.jaas.config="
        + scram.format("broker", users["broker"]),
        "sasl.mechanism.controller.protocol=PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
        "listener.name.controller.plain.sasl.jaas.config="
        + plain.format("controller", users["controller"]),
        # Every request is checked against ACLs; none found is a refusal.
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        "super.users=User:broker;User:controller;User:admin",
    ]


# Authenticated mode: the SASL mechanism of clients and brokers.
MECHANISM = "SCRAM-SHA-512"
# The users Sluice's parts log in as, one per role; each gets the ACLs of its role
# (core/acls.py) but admin, a super user (topics, ACLs, users, the config topic).
ROLES = ("admin", *ACL_ROLES)


def sasl_enabled(settings: BrokerSettings) -> bool:
    """Whether the local cluster runs in authenticated mode (asked for, or formatted so)."""
    return settings.sasl or (_state(settings) / "credentials.json").exists()


def credentials(settings: BrokerSettings) -> dict[str, str]:
    """The passwords of the local cluster's users, made once and kept (mode 0600) in its
    state folder: one per role, the brokers' own and the controllers'."""
    path = _state(settings) / "credentials.json"
    if path.exists():
        found: dict[str, str] = orjson.loads(path.read_bytes())
        return found
    made = {name: secrets.token_urlsafe(24) for name in (*ROLES, "broker", "controller")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        out.write(orjson.dumps(made))
    env_dir = path.parent / "credentials"
    env_dir.mkdir(mode=0o700, exist_ok=True)
    for role in ROLES:
        lines = [f"{k}={v}" for k, v in role_env(settings, role).items()]
        target = env_dir / f"{role}.env"
        with os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write("\n".join(lines) + "\n")
    return made


def role_env(settings: BrokerSettings, role: str) -> dict[str, str]:
    """The `SLUICE_KAFKA_*` settings a service of `role` reaches the local cluster with."""
    env = {"SLUICE_KAFKA_BOOTSTRAP_SERVERS": bootstrap(settings)}
    if sasl_enabled(settings):
        env |= {
            "SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "SLUICE_KAFKA_SASL_MECHANISM": MECHANISM,
            "SLUICE_KAFKA_SASL_USERNAME": role,
            "SLUICE_KAFKA_SASL_PASSWORD": credentials(settings)[role],
        }
    return env


def client_config(
    settings: BrokerSettings, role: str = "admin"
) -> dict[str, str | int | float | bool]:
    """librdkafka properties of a client of the local cluster, logged in as `role`."""
    env = role_env(settings, role)
    conf: dict[str, str | int | float | bool] = {
        "bootstrap.servers": bootstrap(settings),
        "log_level": 0,
    }
    if "SLUICE_KAFKA_SASL_USERNAME" in env:
        conf |= {
            "security.protocol": env["SLUICE_KAFKA_SECURITY_PROTOCOL"],
            "sasl.mechanism": env["SLUICE_KAFKA_SASL_MECHANISM"],
            "sasl.username": env["SLUICE_KAFKA_SASL_USERNAME"],
            "sasl.password": env["SLUICE_KAFKA_SASL_PASSWORD"],
        }
    return conf


def _log_config(settings: BrokerSettings, state: Path) -> tuple[str, str]:
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


def _java_args(settings: BrokerSettings, libs: Path, state: Path) -> list[str]:
    java = _require(
        "java",
        "Java 17+ is required to run the Kafka broker: install a JDK (Debian: apt-get install openjdk-17-jre-headless)",
    )
    name, _ = _log_config(settings, state)
    log_prop = "log4j2.configurationFile" if _major(settings) >= 4 else "log4j.configuration"
    return [
        java,
        f"-Xmx{settings.heap}",
        f"-Xms{settings.heap}",
        "-XX:+UseG1GC",
        f"-D{log_prop}=file:{state / name}",
        "-cp",
        f"{libs}/*",
    ]


def node_pid(node: Node) -> int | None:
    """The pid of a node's process, if it runs."""
    pid_file = node.state / "broker.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return None
    return pid


def broker_pid(settings: BrokerSettings) -> int | None:
    """The pid of the first running node of the cluster this state folder belongs to."""
    for node in nodes(settings):
        pid = node_pid(node)
        if pid is not None:
            return pid
    return None


def wait_for_broker(
    bootstrap: str, timeout: float, auth: dict[str, str | int | float | bool] | None = None
) -> bool:
    """Whether a broker at `bootstrap` answers a metadata request within `timeout` seconds
    (`auth`: the client properties to log in with)."""
    admin = AdminClient({**(auth or {}), "bootstrap.servers": bootstrap, "log_level": 0})
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
    """The client addresses of the local cluster (every node: any one of them may be down)."""
    return ",".join(node.address for node in nodes(settings))


def new_cluster_id() -> str:
    """A random KRaft cluster id, never starting with '-' (the format tool would read an option)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _cluster_id(settings: BrokerSettings) -> str:
    """The cluster's id: made once, shared by every node's storage."""
    path = _state(settings) / "cluster-id"
    if settings.brokers == 1:
        return new_cluster_id()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new_cluster_id())
    return path.read_text().strip()


def _launch(settings: BrokerSettings, libs: Path, node: Node) -> int:
    """Write a node's configuration, format its storage the first time, start its JVM."""
    java = _java_args(settings, libs, node.state)
    node.state.mkdir(parents=True, exist_ok=True)
    props = node.state / "server.properties"
    props.write_text(server_properties(settings, node.node_id))
    props.chmod(0o600)  # the brokers' and controllers' passwords in authenticated mode
    name, text = _log_config(settings, node.state)
    (node.state / name).write_text(text)
    if not (node.state / "data" / "meta.properties").exists():
        fmt = subprocess.run(  # noqa: S603
            [
                *java,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                _cluster_id(settings),
                "-c",
                str(props),
                *_scram_users(settings),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise BrokerError(
                f"formatting Kafka storage failed: {(fmt.stderr or fmt.stdout).strip()[-300:]}"
            )
    pid = spawn_detached([*java, "kafka.Kafka", str(props)], node.state / "broker.out")
    (node.state / "broker.pid").write_text(str(pid))
    return pid


def _scram_users(settings: BrokerSettings) -> list[str]:
    """The format tool's arguments that create every SCRAM user with the storage."""
    if not sasl_enabled(settings):
        return []
    users = credentials(settings)
    return [
        arg
        for name in (*ROLES, "broker")
        for arg in ("--add-scram", f"{MECHANISM}=[name={name},password={users[name]}]")
    ]


def _check_layout(settings: BrokerSettings) -> None:
    state = _state(settings)
    single = (state / "data" / "meta.properties").exists()
    cluster = any(state.glob("node-*/data/meta.properties"))
    if settings.brokers > 1 and single:
        raise BrokerError(
            f"{state} holds a single broker's data: stop it and remove the folder (make clean)"
            " before starting a cluster there, or use another SLUICE_BROKER_STATE_DIR"
        )
    formatted = single or cluster
    if settings.sasl and formatted and not (state / "credentials.json").exists():
        raise BrokerError(
            f"{state} holds a cluster formatted without authentication: stop it and remove the"
            " folder (make clean) to start it with --sasl, or use another SLUICE_BROKER_STATE_DIR"
        )
    if settings.brokers == 1 and cluster:
        raise BrokerError(
            f"{state} holds a cluster's nodes: start it with --brokers"
            f" {len(list(state.glob('node-*')))}, or use another SLUICE_BROKER_STATE_DIR"
        )


def start_broker(settings: BrokerSettings, console: Console | None = None) -> int:
    """Start every node that does not run; returns the first node's pid once every node
    answers metadata requests."""
    console = console or Console(stderr=True)
    _check_layout(settings)
    cluster = nodes(settings)
    running = {n.node_id: node_pid(n) for n in cluster}
    if all(running.values()) and all(
        wait_for_broker(n.address, 5, client_config(settings)) for n in cluster
    ):
        console.print(f"kafka    already running, pid {running[1]}, {bootstrap(settings)}")
        return running[1] or 0
    libs = ensure_jars(settings, console)
    for node in cluster:
        if running[node.node_id] is None:
            running[node.node_id] = _launch(settings, libs, node)
    for node in cluster:
        _wait_node(settings, node, console)
    first = running[1] or 0
    if len(cluster) == 1:
        console.print(
            f"kafka    running, pid {first}, {bootstrap(settings)}, log {cluster[0].state / 'broker.log'}"
        )
    else:
        console.print(
            f"kafka    running, {len(cluster)} brokers, {bootstrap(settings)}, logs"
            f" {_state(settings)}/node-*/broker.log"
        )
    return first


def start_node(settings: BrokerSettings, node_id: int, console: Console | None = None) -> int:
    """Start one node of the cluster (a no-op when it runs); its pid once it answers."""
    console = console or Console(stderr=True)
    node = _node(settings, node_id)
    pid = node_pid(node)
    if pid is None:
        pid = _launch(settings, ensure_jars(settings, console), node)
    _wait_node(settings, node, console)
    return pid


def kill_node(settings: BrokerSettings, node_id: int) -> bool:
    """SIGKILL one node (a crash: no clean shutdown); False when it was not running."""
    node = _node(settings, node_id)
    pid = node_pid(node)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.05)
    (node.state / "broker.pid").unlink(missing_ok=True)
    return True


def _wait_node(settings: BrokerSettings, node: Node, console: Console) -> None:
    pid = node_pid(node)
    assert pid is not None, "launched before it is waited for"
    starting = f"starting Kafka {settings.version} on {node.address}"
    with console.status(f"{starting} ...") as status:
        deadline = time.monotonic() + settings.start_timeout_s
        recovered: tuple[int, int] | None = None
        while time.monotonic() < deadline:
            if not alive(pid):
                (node.state / "broker.pid").unlink(missing_ok=True)
                raise BrokerError(f"the broker exited: {_last_error(node.state)}")
            progress = log_recovery(node.state / "broker.log")
            if progress is not None and progress != recovered:
                # Loading many partitions after an unclean stop takes a while: as long as it
                # moves, the wait goes on, and the operator sees how far it got.
                recovered = progress
                deadline = time.monotonic() + settings.start_timeout_s
                status.update(f"{starting}: loading logs, {progress[0]}/{progress[1]} partitions")
            if wait_for_broker(node.address, 1.0, client_config(settings)):
                return
    stop_broker(settings, console)
    raise BrokerError(
        f"the broker did not answer within {settings.start_timeout_s:.0f}s; see {node.state / 'broker.log'}"
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
    """SIGTERM every node and wait (SIGKILL after `timeout`); False when none was running."""
    console = console or Console(stderr=True)
    pids = [(n, pid) for n in nodes(settings) if (pid := node_pid(n)) is not None]
    if not pids:
        console.print("kafka    was not running")
        return False
    for _, pid in pids:
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for _, pid in pids):
        time.sleep(0.1)
    for node, pid in pids:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.1)
        (node.state / "broker.pid").unlink(missing_ok=True)
    shown = ", ".join(str(pid) for _, pid in pids)
    console.print(f"kafka    stopped (pid {shown})")
    return True


def stop_node(settings: BrokerSettings, node_id: int, console: Console | None = None) -> bool:
    """SIGTERM one node and wait for it (a rolling restart's step); False when it was down."""
    console = console or Console(stderr=True)
    node = _node(settings, node_id)
    pid = node_pid(node)
    if pid is None:
        console.print(f"kafka    node {node_id} was not running")
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    if alive(pid):
        os.killpg(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.1)
    (node.state / "broker.pid").unlink(missing_ok=True)
    console.print(f"kafka    node {node_id} stopped (pid {pid})")
    return True


def cluster_nodes_on_disk(settings: BrokerSettings) -> int | None:
    """How many nodes the state folder holds a cluster of (None: none, or one broker)."""
    found = list(_state(settings).glob("node-*/server.properties"))
    return len(found) or None


@dataclass(frozen=True)
class NodeStatus:
    """One node as `sluice kafka status` shows it."""

    node: Node
    pid: int | None
    answering: bool


@dataclass(frozen=True)
class ClusterStatus:
    """The local cluster: its nodes, its controller, its topics and their replication."""

    nodes: list[NodeStatus]
    controller: int | None
    topics: int | None
    under_replicated: list[str]
    offline: list[str]


def broker_status(settings: BrokerSettings) -> tuple[int | None, int | None]:
    """(pid, number of topics) of the local broker; (None, None) when it is not running."""
    status = cluster_status(settings)
    pid = next((n.pid for n in status.nodes if n.pid is not None), None)
    return (None, None) if pid is None else (pid, status.topics)


def cluster_status(settings: BrokerSettings) -> ClusterStatus:
    """Every node (running, answering), the active controller, and the partitions whose
    replicas are not all in sync (under-replicated) or that have no leader (offline)."""
    shown = []
    auth = client_config(settings)
    for node in nodes(settings):
        pid = node_pid(node)
        shown.append(
            NodeStatus(node, pid, pid is not None and wait_for_broker(node.address, 2, auth))
        )
    reachable = ",".join(n.node.address for n in shown if n.answering)
    if not reachable:
        return ClusterStatus(shown, None, None, [], [])
    admin = AdminClient({**auth, "bootstrap.servers": reachable})
    try:
        meta = admin.list_topics(timeout=5)
        controller = admin.describe_cluster(request_timeout=5).result(timeout=10).controller
    except (KafkaException, TimeoutError):
        return ClusterStatus(shown, None, None, [], [])
    under, offline = [], []
    for topic in meta.topics.values():
        for p in topic.partitions.values():
            name = f"{topic.topic}[{p.id}]"
            if p.leader < 0:
                offline.append(name)
            elif len(p.isrs) < len(p.replicas):
                under.append(name)
    return ClusterStatus(
        shown,
        None if controller is None else int(controller.id),
        len(meta.topics),
        sorted(under),
        sorted(offline),
    )
