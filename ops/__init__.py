"""The tools: the `sluice` CLI, the local broker and process runner, the demo, replay, DLQ
tools and benchmarks. The top layer: it imports every package and nothing imports it."""

__all__: list[str] = []
