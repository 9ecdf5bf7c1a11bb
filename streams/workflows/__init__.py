"""The workflow orchestrator (README, "Workflows")."""
