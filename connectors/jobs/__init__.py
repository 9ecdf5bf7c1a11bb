"""The job worker: queues' jobs run by their executor, with retries, leases and a DLQ.

`worker.py` is one queue's loop (reading, deciding from the status table, priorities,
ordering keys, retries, dead letters, commits); `executor.py` runs a job (the in-process
Python executor); `process.py` is the process around the loops; `builtin.py` holds job
functions that come with Sluice. A job function raises `Fatal` for a job that can never
succeed and may take a `JobContext` to know which job and attempt it runs.
"""

from connectors.jobs.executor import Fatal, JobContext

__all__ = ["Fatal", "JobContext"]
