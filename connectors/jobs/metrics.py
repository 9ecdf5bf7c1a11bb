"""The job worker's Prometheus metrics, per queue."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
_MEMORY_BUCKETS = tuple(float(2**n * 1024 * 1024) for n in range(0, 15))
_RUN_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)


class JobMetrics:
    """Counters of what happened to jobs, gauges of where they are, and their times."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["queue"], registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["queue"], registry=registry)

        self.started = counter("sluice_jobs_started", "Attempts started.")
        self.completed = counter("sluice_jobs_completed", "Jobs completed.")
        self.retried = counter("sluice_jobs_retried", "Attempts failed, the job to retry.")
        self.dead = counter("sluice_jobs_dead", "Jobs dead-lettered (attempts spent, fatal).")
        self.fired = counter("sluice_jobs_schedule_fires", "Jobs submitted by schedule ticks.")
        self.rate_limited = counter(
            "sluice_jobs_rate_limit_waits",
            "Times a due job waited for the queue's rate limit (this process's share).",
        )
        self.cancelled = counter(
            "sluice_jobs_cancelled", "Jobs cancelled (before they ran, or while they ran)."
        )
        self.failed = counter("sluice_jobs_failed", "Attempts failed (retried or dead).")
        self.timed_out = counter("sluice_jobs_timed_out", "Attempts ended at their timeout.")
        self.processes = gauge(
            "sluice_jobs_processes", "Programs of command executors running now."
        )
        self.peak_memory = Histogram(
            "sluice_jobs_peak_memory_bytes",
            "Peak resident memory of command jobs' programs.",
            ["queue"],
            buckets=_MEMORY_BUCKETS,
            registry=registry,
        )
        self.leased = counter("sluice_jobs_leased", "Attempts leased to HTTP workers.")
        self.acked = counter("sluice_jobs_acked", "Leased attempts acked (completed).")
        self.nacked = counter("sluice_jobs_nacked", "Leased attempts nacked (failed).")
        self.extended = counter("sluice_jobs_lease_extensions", "Leases extended.")
        self.lease_expiries = counter(
            "sluice_jobs_lease_expiries",
            "Attempts found stalled: ACTIVE under an expired lease (their worker was gone).",
        )
        self.duplicates = counter(
            "sluice_jobs_duplicates_skipped",
            "Job records read for a job already finished or past that attempt.",
        )
        self.expired = counter(
            "sluice_jobs_statuses_expired",
            "Finished jobs' statuses deleted (a tombstone) after their retention.",
        )
        self.ready = gauge("sluice_jobs_ready", "Jobs due and waiting for a slot.")
        self.scheduled = gauge(
            "sluice_jobs_scheduled", "Job records held until due (delays, backoff, leases)."
        )
        self.in_flight = gauge("sluice_jobs_in_flight", "Attempts running in this process.")
        self.wait_seconds = Histogram(
            "sluice_jobs_wait_seconds",
            "From due (or submitted) to started.",
            ["queue"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.run_seconds = Histogram(
            "sluice_jobs_run_seconds",
            "How long attempts ran.",
            ["queue"],
            buckets=_RUN_BUCKETS,
            registry=registry,
        )
