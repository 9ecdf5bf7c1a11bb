"""The shared core below every service: settings, errors, topic names, the pipeline config
model, the failure-header contract, Kafka producer and admin helpers, the follower of
compacted topics, due-time lanes and the process shell. It imports no other Sluice package."""

__all__: list[str] = []
