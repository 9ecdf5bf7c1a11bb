"""The ClickHouse warehouse sink: consume destination topics, load exactly-once batches.

`sink` is the consumer loop (batches, offsets, retries in place); `clickhouse` the client
and its tables; `layout` and `loader` turn events into the RudderStack table layout;
`queries`, `query_api` and `query_auth` the read-only query endpoint; `process` the sink
process that runs them all.
"""

__all__: list[str] = []
