"""Workflows: NoETL playbooks run on topics (README, "Workflows").

- `playbook`: the supported subset of NoETL's `noetl.io/v2` format, checked when applied;
- `templates`: Jinja2 in a sandbox, with native values for a lone `{{ expression }}`;
- `events`: the event log `sluice.workflows.events` and the step jobs' contract;
- `engine`: a run's state as a fold of its events, and what the orchestrator does next;
- `catalog`: applied playbooks and their versions;
- `credentials`: named credentials, resolved by the tool runner only, and redaction.
"""
