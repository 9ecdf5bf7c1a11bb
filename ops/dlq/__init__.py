"""Dead-letter queues: list, show and redrive records, with an audit trail.

`letters` reads and filters a destination's DLQ, `history` reads what earlier redrives
sent from the audit topic, `redrive` sends records back and audits itself.
"""

from ops.dlq.history import RefSet, redrive_history
from ops.dlq.letters import DeadLetter, DlqFilter, dead_letters, read_topic
from ops.dlq.redrive import RedriveReport, redrive

__all__ = [
    "DeadLetter",
    "DlqFilter",
    "RedriveReport",
    "RefSet",
    "dead_letters",
    "read_topic",
    "redrive",
    "redrive_history",
]
