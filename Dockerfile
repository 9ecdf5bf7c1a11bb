# The Sluice image: one Python install, the role picked by the command (gateway, worker, sink).
FROM python:3.11.7-slim-bookworm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY gateway gateway
COPY streams streams
COPY connectors connectors
COPY schemas schemas
COPY ops ops
COPY sluice.yaml ./
RUN pip install --no-cache-dir .
ENTRYPOINT ["sluice"]
CMD ["--help"]
