"""The workflow orchestrator: runs playbooks from the event log `sluice.workflows.events`.

One loop per process, in the consumer group `SLUICE_WORKFLOWS_CONSUMER_GROUP` on the event
topic: Kafka gives each process some partitions, and with them the runs keyed there.

- **State.** A run's state is the fold of its events (`core.workflows.engine.apply`). On
  assignment the loop reads its partitions from their beginning, and decides nothing for
  a partition until it has read it to its end: a restarted orchestrator resumes each run
  exactly where the log left it, and does not make a decision again that is in the log.
- **Decisions.** After each batch of events (and at a retry's due time) the loop asks the
  engine what happens next, and writes it in one Kafka transaction: the new events, the
  jobs that run the steps (on the workflow queue, or a named queue for `job` steps),
  cancel requests for jobs, events for other runs (sub-playbooks, parents), each touched
  run's summary on `sluice.workflows.runs` (the table: compacted, keyed by execution id)
  and the consumer offsets. The transactional id is the same across restarts of a process
  (`SLUICE_WORKFLOWS_INSTANCE`), so a restarted orchestrator aborts what its killed
  predecessor left open; everything reads the topics with `read_committed`.
- **Job outcomes.** Step jobs report through events (the tool runner writes
  `command.completed` / `command.failed`). The loop follows the job status topic as well:
  a step job that ended DEAD or CANCELLED without an event (a timeout, a crash) fails its
  command, and a `job` step's job's final status is its command's outcome.
- **Schedules.** The process that owns partition 0 starts the runs of catalog entries with
  a cron schedule; a tick's run id is derived from the path and the tick, so a tick fired
  twice is one run.

`/ready` fails while the catalog, the job statuses or the assigned partitions have not been
read to their end; `/health` once the loop died.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.follower import CompactedFollower
from core.jobs import CANCEL, CANCELLED, COMPLETED, DEAD, JobStatus, StatusTable, ticks
from core.kafka import producer_config
from core.settings import KafkaSettings, WorkflowSettings
from core.shell import Probe, Probes, joined
from core.topics import Topics
from core.workflows import engine
from core.workflows import events as ev
from core.workflows.catalog import Catalog
from schemas.codec import job_codec

log = structlog.get_logger("sluice.workflows")

# A job that ended DEAD may have written its own `command.failed` just before: it is
# given this long to arrive before the status speaks for it.
DEAD_GRACE_MS = 2000
SCHEDULE_GRACE_MS = 5000
TOPIC_CACHE_S = 10.0


class Metrics:
    """The orchestrator's Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Gauge(
            "sluice_workflow_runs",
            "Runs this orchestrator holds, by state",
            ["state"],
            registry=registry,
        )
        self.runs_finished = Counter(
            "sluice_workflow_runs_finished_total",
            "Runs that ended, by state",
            ["state"],
            registry=registry,
        )
        self.steps = Gauge(
            "sluice_workflow_steps",
            "Step instances of held runs, by state",
            ["state"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "sluice_workflow_command_seconds",
            "From a step's command issued to its outcome, by tool",
            ["tool"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.loop_items = Gauge(
            "sluice_workflow_loop_items_in_flight", "Loop items running now", registry=registry
        )
        self.events = Counter(
            "sluice_workflow_events_total",
            "Events written by this orchestrator, by type",
            ["type"],
            registry=registry,
        )
        self.transactions = Counter(
            "sluice_workflow_transactions_total", "Transactions committed", registry=registry
        )


@dataclass
class _Partition:
    caught_up: bool = False


@dataclass
class _Batch:
    """What one transaction writes."""

    records: list[
        tuple[str, bytes, bytes | None, list[tuple[str, str | bytes | None]] | None, int | None]
    ] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)


class Orchestrator:
    """The loop (run it with `run()` in a thread; `stop()` ends it)."""

    def __init__(
        self, kafka: KafkaSettings, settings: WorkflowSettings, registry: CollectorRegistry
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.topics = Topics(kafka.topic_prefix)
        self.metrics = Metrics(registry)
        self.catalog = Catalog()
        self.statuses = StatusTable()
        self._changed: deque[JobStatus] = deque()
        self.statuses.watch(self._status_changed)
        self.catalog_follower = CompactedFollower(
            kafka, self.topics.workflows_catalog, self.catalog.apply, name="workflows-catalog"
        )
        self.status_follower = CompactedFollower(
            kafka, self.topics.jobs_status, self.statuses.apply, name="workflows-statuses"
        )
        self.env = engine.Env(
            playbook=self.catalog.lookup,
            queue=settings.queue,
            timeout_s=settings.timeout_s,
            max_in_flight=settings.max_in_flight,
        )
        self.codec = job_codec()
        self.runs: dict[str, engine.Run] = {}
        self.finished: set[str] = set()
        self.partition_of: dict[str, int] = {}
        self.partitions: dict[int, _Partition] = {}
        self.by_job: dict[str, tuple[str, str]] = {}
        self._deferred: list[JobStatus] = []
        self._topics_seen: dict[str, list[int]] = {}
        self._topics_at = 0.0
        self._stop = threading.Event()
        self._assigned_changed = False
        self._schedule_from = engine_now() - SCHEDULE_GRACE_MS
        self.failure: str | None = None
        self.transactional_id = f"{kafka.topic_prefix}-workflows-{settings.instance}"

    # -- probes -------------------------------------------------------------------------

    def ready(self) -> Probe:
        behind = [p for p, s in self.partitions.items() if not s.caught_up]
        return joined(
            self.failure,
            None if self.catalog_follower.caught_up else "the playbook catalog is not read yet",
            None if self.status_follower.caught_up else "the job statuses are not read yet",
            f"event partitions {behind} not read to their end yet" if behind else None,
        )

    def health(self) -> Probe:
        return self.failure

    # -- the loop -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.failure = f"the orchestrator loop died: {exc!r}"
            log.exception("orchestrator loop died")
            raise

    def _run(self) -> None:
        self.catalog_follower.start()
        self.status_follower.start()
        self.producer = Producer(
            producer_config(
                self.kafka,
                **{
                    "transactional.id": self.transactional_id,
                    "linger.ms": 2,
                    "compression.type": "lz4",
                    "message.max.bytes": 2 * 1024 * 1024,
                },
            )
        )
        self.producer.init_transactions(30)
        self.consumer = Consumer(
            self.kafka.client_config()
            | {
                "group.id": f"{self.kafka.topic_prefix}-{self.settings.consumer_group}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 20,
                "session.timeout.ms": 10_000,
            }
        )
        self.consumer.subscribe(
            [self.topics.workflows_events], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        self.catalog_follower.wait_caught_up(30)
        self.status_follower.wait_caught_up(30)
        try:
            while not self._stop.is_set():
                self._turn()
        finally:
            self.consumer.close()
            self.catalog_follower.stop()
            self.status_follower.stop()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            tp.offset = -2  # from the beginning: the state is the fold of the log
            self.partitions[tp.partition] = _Partition()
        consumer.assign(partitions)
        self._assigned_changed = True
        log.info("event partitions assigned", partitions=[tp.partition for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        for eid in [e for e, p in self.partition_of.items() if p in gone]:
            self.runs.pop(eid, None)
            self.finished.discard(eid)
            self.partition_of.pop(eid, None)
        for p in gone:
            self.partitions.pop(p, None)
        consumer.unassign()

    def _turn(self) -> None:
        now = engine_now()
        dues = [d for r in self.runs.values() if (d := engine.next_due(r)) is not None]
        wait = 0.1 if not dues else max(0.0, min(0.1, (min(dues) - now) / 1000))
        msgs = self.consumer.consume(1000, wait)
        batch = _Batch()
        caught_before = self._all_caught_up()
        for msg in msgs:
            self._read(msg, batch)
        all_caught = self._all_caught_up()
        if not all_caught:
            return
        now = engine_now()
        if not caught_before or self._assigned_changed:
            # Just caught up: every held run may have something to do.
            self._assigned_changed = False
            batch.touched.update(self.runs)
            self._deferred.extend(
                s for job_id in list(self.by_job) if (s := self.statuses.get(job_id)) is not None
            )
        self._job_outcomes(batch, now)
        for eid, run in list(self.runs.items()):
            due = engine.next_due(run)
            if due is not None and due <= now:
                batch.touched.add(eid)
        if 0 in self.partitions:
            self._schedules(batch, now)
        for eid in sorted(batch.touched):
            held = self.runs.get(eid)
            if held is not None:
                self._decide(held, now, batch)
        self._commit(batch)

    def _all_caught_up(self) -> bool:
        return bool(self.partitions) and all(p.caught_up for p in self.partitions.values())

    def _read(self, msg: Message, batch: _Batch) -> None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                state = self.partitions.get(msg.partition() or 0)
                if state is not None and not state.caught_up:
                    state.caught_up = True
                    log.info("event partition read to its end", partition=msg.partition())
                return
            raise KafkaException(err)
        value = msg.value()
        if value is None:
            return
        try:
            evt = ev.decode(value)
        except ValueError as exc:
            log.warning(
                "not a workflow event; skipped",
                partition=msg.partition(),
                offset=msg.offset(),
                error=str(exc),
            )
            return
        self._fold(evt, msg.partition() or 0, batch)

    def _fold(self, evt: dict[str, Any], partition: int, batch: _Batch) -> None:
        eid = evt["execution_id"]
        if eid in self.finished:
            return
        before = self.runs.get(eid)
        try:
            found = engine.apply(before, evt)
        except Exception as exc:  # an event the fold cannot take: skipped
            log.warning("a workflow event could not be applied", execution_id=eid, error=str(exc))
            return
        if found is None:
            return
        run = found
        if before is None:
            self.runs[eid] = run
            self.partition_of[eid] = partition
        self._index(run)
        if evt["type"] in (ev.COMMAND_COMPLETED, ev.COMMAND_FAILED):
            self._observe(evt)
        batch.touched.add(eid)

    def _index(self, run: engine.Run) -> None:
        for cid, command in run.commands.items():
            if command.job_id is not None and command.job_id not in self.by_job:
                self.by_job[command.job_id] = (run.execution_id, cid)

    def _observe(self, evt: dict[str, Any]) -> None:
        duration = evt.get("duration_ms")
        if isinstance(duration, int):
            self.metrics.step_seconds.labels(str(evt.get("tool") or "unknown")).observe(
                duration / 1000
            )

    # -- job statuses ---------------------------------------------------------------------

    def _status_changed(self, old: JobStatus | None, new: JobStatus | None) -> None:
        if new is not None and new.finished:
            self._changed.append(new)

    def _job_outcomes(self, batch: _Batch, now: int) -> None:
        todo, self._deferred = self._deferred, []
        while self._changed:
            todo.append(self._changed.popleft())
        for status in todo:
            found = self.by_job.get(status.id)
            if found is None:
                continue
            eid, cid = found
            run = self.runs.get(eid)
            command = run.commands.get(cid) if run is not None else None
            if run is None or command is None:
                self.by_job.pop(status.id, None)
                continue
            runner = command.queue == self.settings.queue and command.kind != "job"
            if status.state == COMPLETED and runner:
                continue  # its runner's event says more, and it is in the log before
            if runner and now - status.updated_at_ms < DEAD_GRACE_MS:
                self._deferred.append(status)
                continue
            if status.state == COMPLETED:
                evt = ev.event(
                    eid,
                    ev.COMMAND_COMPLETED,
                    f"{cid}:completed",
                    command_id=cid,
                    result=status.result,
                    job_id=status.id,
                    tool=command.kind,
                )
            else:
                reason = status.error or (
                    "the job was cancelled" if status.state == CANCELLED else "the job died"
                )
                if status.state == DEAD and "JobTimeout" in reason:
                    reason = f"timeout: {reason}"
                evt = ev.event(
                    eid,
                    ev.COMMAND_FAILED,
                    f"{cid}:failed",
                    command_id=cid,
                    error=reason,
                    job_id=status.id,
                    tool=command.kind,
                )
            self._append_event(evt, batch)
            self._fold(evt, self.partition_of[eid], batch)
            self.by_job.pop(status.id, None)

    # -- schedules ----------------------------------------------------------------------

    def _schedules(self, batch: _Batch, now: int) -> None:
        start, self._schedule_from = self._schedule_from, now
        for entry in self.catalog.latest():
            if entry.cron is None:
                continue
            for tick in ticks(entry.cron, start, now, 1):
                eid = engine.derived(f"workflow-schedule:{entry.path}:{tick}")
                evt = ev.event(
                    eid,
                    ev.PLAYBOOK_REQUESTED,
                    f"{eid}:requested",
                    path=entry.path,
                    workload=entry.workload or {},
                    schedule=entry.cron,
                    tick_ms=tick,
                )
                self._append_event(evt, batch)

    # -- decisions ------------------------------------------------------------------------

    def _decide(self, run: engine.Run, now: int, batch: _Batch) -> None:
        out = engine.decide(run, now, self.env)
        for evt in out.events:
            self._append_event(evt, batch)
            if evt["type"] in (ev.COMMAND_COMPLETED, ev.COMMAND_FAILED):
                self._observe(evt)
        for evt in out.messages:
            self._append_event(evt, batch)
        for submit in out.submits:
            self._submit(run, submit, batch, now)
        for queue, job_id in out.cancels:
            self._cancel_job(queue, job_id, batch)
        self._index(run)

    def _append_event(self, evt: dict[str, Any], batch: _Batch) -> None:
        batch.records.append(
            (self.topics.workflows_events, evt["execution_id"].encode(), ev.encode(evt), None, None)
        )
        self.metrics.events.labels(evt["type"]).inc()

    def _partitions(self, topic: str) -> list[int] | None:
        if time.monotonic() - self._topics_at > TOPIC_CACHE_S or topic not in self._topics_seen:
            meta = self.producer.list_topics(timeout=5)
            self._topics_seen = {
                name: sorted(t.partitions) for name, t in meta.topics.items() if t.error is None
            }
            self._topics_at = time.monotonic()
        return self._topics_seen.get(topic)

    def _submit(self, run: engine.Run, submit: engine.JobSubmit, batch: _Batch, now: int) -> None:
        topic = self.topics.queue(submit.queue).priority(submit.priority)
        payload = orjson.dumps(submit.payload, default=str).decode()
        reason = None
        if self._partitions(topic) is None:
            reason = f"no job queue {submit.queue!r} (priority {submit.priority})"
        elif len(payload) > self.settings.max_result_bytes:
            reason = (
                f"the step's job is {len(payload)} bytes, over {self.settings.max_result_bytes}"
            )
        if reason is not None:
            cid = self.by_job_command(run, submit.job_id)
            if cid is not None:
                evt = ev.event(
                    run.execution_id,
                    ev.COMMAND_FAILED,
                    f"{cid}:failed",
                    command_id=cid,
                    error=reason,
                )
                self._append_event(evt, batch)
                self._fold(evt, self.partition_of[run.execution_id], batch)
            return
        value = self.codec.encode(
            {
                "job_id": submit.job_id,
                "queue": submit.queue,
                "priority": submit.priority,
                "payload": payload,
                "submitted_at": now,
                "run_at": None,
                "max_attempts": submit.max_attempts,
                "timeout_ms": submit.timeout_ms,
                "idempotency_key": None,
                "ordering_key": None,
                "tags": [f"workflow:{run.execution_id}"],
            }
        )
        batch.records.append((topic, submit.job_id.encode(), value, None, None))

    @staticmethod
    def by_job_command(run: engine.Run, job_id: str) -> str | None:
        for cid, command in run.commands.items():
            if command.job_id == job_id:
                return cid
        return None

    def _cancel_job(self, queue: str, job_id: str, batch: _Batch) -> None:
        topics = self.topics.queue(queue)
        level = 0
        while True:
            topic = topics.priority(level)
            parts = self._partitions(topic)
            if parts is None:
                break
            for partition in parts:
                batch.records.append(
                    (topic, job_id.encode(), None, [(CANCEL, job_id.encode())], partition)
                )
            level += 1

    def _commit(self, batch: _Batch) -> None:
        for eid in batch.touched:
            run = self.runs.get(eid)
            if run is None:
                continue
            summary = engine.summary(run, self.settings.status_result_bytes)
            batch.records.append(
                (
                    self.topics.workflows_runs,
                    eid.encode(),
                    orjson.dumps(summary, default=str),
                    None,
                    None,
                )
            )
        if not batch.records:
            return
        producer = self.producer
        producer.begin_transaction()
        try:
            for topic, key, value, headers, partition in batch.records:
                while True:
                    try:
                        if partition is None:
                            producer.produce(topic, value, key, headers=headers)
                        else:
                            producer.produce(
                                topic, value, key, partition=partition, headers=headers
                            )
                        break
                    except BufferError:
                        producer.poll(0.05)
            positions = self.consumer.position(self.consumer.assignment())
            producer.send_offsets_to_transaction(
                [tp for tp in positions if tp.offset >= 0],
                self.consumer.consumer_group_metadata(),
                30,
            )
            producer.commit_transaction(60)
        except KafkaException as exc:
            log.error("a workflow transaction failed; reading the log again", error=str(exc))
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(30)
            self._reset()
            return
        self.metrics.transactions.inc()
        self._evict(batch)
        self._gauges()

    def _reset(self) -> None:
        """Forget the state and read the assigned partitions again from their beginning."""
        self.runs.clear()
        self.finished.clear()
        self.partition_of.clear()
        self.by_job.clear()
        assignment = self.consumer.assignment()
        for tp in assignment:
            self.partitions[tp.partition] = _Partition()
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, -2))
        self._assigned_changed = True

    def _evict(self, batch: _Batch) -> None:
        for eid in batch.touched:
            run = self.runs.get(eid)
            if run is not None and run.finished:
                self.metrics.runs_finished.labels(run.status).inc()
                self.runs.pop(eid, None)
                self.finished.add(eid)
                for cid_job in [j for j, (e, _) in self.by_job.items() if e == eid]:
                    self.by_job.pop(cid_job, None)

    def _gauges(self) -> None:
        runs: dict[str, int] = {}
        steps: dict[str, int] = {}
        items = 0
        for run in self.runs.values():
            runs[run.status] = runs.get(run.status, 0) + 1
            for step in run.steps.values():
                steps[step.state] = steps.get(step.state, 0) + 1
                if step.items is not None and step.state == engine.RUNNING:
                    items += step.in_flight()
        for state in (engine.REQUESTED, engine.RUNNING):
            self.metrics.runs.labels(state).set(runs.get(state, 0))
        for state in (engine.RUNNING, engine.COMPLETED, engine.FAILED, engine.CANCELLED):
            self.metrics.steps.labels(state).set(steps.get(state, 0))
        self.metrics.loop_items.set(items)


def engine_now() -> int:
    return ev.now_ms()


def main() -> None:
    """Run the orchestrator until SIGTERM or SIGINT."""
    kafka = KafkaSettings()
    settings = WorkflowSettings()
    registry = CollectorRegistry()
    orchestrator = Orchestrator(kafka, settings, registry)
    probes = Probes(registry, health=orchestrator.health, ready=orchestrator.ready)
    server = probes.serve_in_thread(settings.host, settings.port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: orchestrator.stop())
    log.info("workflow orchestrator started", port=settings.port, group=settings.consumer_group)
    try:
        orchestrator.run()
    finally:
        server.shutdown()
