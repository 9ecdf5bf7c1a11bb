# The Sluice image: one Python install, the role picked by the command (gateway, worker, sink).

# The command executor's spawn server and the example C++ jobs, built with Debian's
# toolchain on the same base as the image below (static: the image has no C++ runtime).
FROM python:3.11.7-slim-bookworm AS native
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY connectors/jobs/launch/sluice-launch.c examples/jobs/*.cpp ./
RUN mkdir -p /out/jobs \
    && gcc -O2 -Wall -Wextra -static -o /out/sluice-launch sluice-launch.c \
    && for src in *.cpp; do g++ -O2 -std=c++17 -Wall -Wextra -static -o "/out/jobs/${src%.cpp}" "$src"; done

FROM python:3.11.7-slim-bookworm
WORKDIR /app
# Next to the image's Python, where the command executor looks for it.
COPY --from=native /out/sluice-launch /usr/local/bin/sluice-launch
COPY --from=native /out/jobs build/jobs
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
