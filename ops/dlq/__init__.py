"""Dead-letter queues: list, show and redrive records, with an audit trail.

`letters` reads and filters a DLQ (a destination's, or a job queue's as `jobs.<queue>`),
`jobs` reads dead jobs and plans their redrive, `history` reads what earlier redrives
sent from the audit topic, `redrive` sends records back and audits itself.
"""

from ops.dlq.history import RefSet, redrive_history
from ops.dlq.jobs import DeadJob, JobSkips, dead_jobs
from ops.dlq.letters import (
    DeadLetter,
    DlqFilter,
    DlqSummary,
    dead_letters,
    dlq_overview,
    job_queue,
    read_topic,
)
from ops.dlq.redrive import RedriveReport, redrive

__all__ = [
    "DeadJob",
    "DeadLetter",
    "DlqFilter",
    "DlqSummary",
    "JobSkips",
    "RedriveReport",
    "RefSet",
    "dead_jobs",
    "dead_letters",
    "dlq_overview",
    "job_queue",
    "read_topic",
    "redrive",
    "redrive_history",
]
