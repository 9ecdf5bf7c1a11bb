#!/usr/bin/env python3
"""A job for Sluice's command executor, in Python: counts the words of `payload["text"]`.

The contract (README, "Job executors"): the job as one JSON document on stdin, the result
as one JSON document on stdout, progress as JSON lines on stderr, other stderr lines the
job's log; exit 0 completes the job, 75 asks for a retry, anything else fails it.

Payload fields: `text` (the words; the result gives it back as it came), `sleep_s` (sleep
first, reporting progress), `ledger` (a file to append `{"id", "attempt"}` to when done:
the tests count completions by it), `fail_attempts` (exit 75 on attempts up to this).
"""

import json
import os
import sys
import time


def progress(fraction: float, message: str) -> None:
    print(json.dumps({"progress": fraction, "message": message}), file=sys.stderr, flush=True)


def main() -> int:
    job = json.load(sys.stdin)
    payload = job.get("payload") or {}
    if job["attempt"] <= int(payload.get("fail_attempts", 0)):
        print(f"attempt {job['attempt']} asks for a retry", file=sys.stderr)
        return 75
    sleep_s = float(payload.get("sleep_s", 0))
    steps = 10 if sleep_s else 0
    for step in range(steps):
        progress(step / steps, f"step {step + 1} of {steps}")
        time.sleep(sleep_s / steps)
    text = str(payload.get("text", ""))
    words = text.split()
    progress(1.0, f"{len(words)} words")
    if "ledger" in payload:
        line = json.dumps({"id": job["id"], "attempt": job["attempt"]}) + "\n"
        fd = os.open(payload["ledger"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, line.encode())
        os.close(fd)
    json.dump({"words": len(words), "text": text, "cwd": os.getcwd()}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
