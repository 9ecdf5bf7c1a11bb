"""Operations: settings, topic names, configuration, the local broker and the `sluice` CLI."""

__all__: list[str] = []
