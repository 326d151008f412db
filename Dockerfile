# agent-sidecar as a container sidecar. Build: docker build -t agent-sidecar .
# Run next to the agent's container, sharing /run/agent-sidecar (the relay socket) and the
# network namespace (agentapi on localhost:3284). Works with a read-only root filesystem.

FROM python:3.12-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python -m build --wheel --outdir /dist


FROM python:3.12-slim
# tini reaps children and forwards SIGTERM to the daemon, which then does its final upload.
# tini is not version-pinned: the base image's Debian release fixes it, and a pin would
# break the build at every Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home \
       --shell /usr/sbin/nologin sidecar \
    && install -d -m 0700 -o sidecar -g sidecar /run/agent-sidecar
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AGENT_SIDECAR_SOCKET=/run/agent-sidecar/agent-sidecar.sock \
    AGENT_SIDECAR_LOG_FORMAT=json
VOLUME ["/run/agent-sidecar"]
USER 10001:10001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["agent-sidecar", "check"]
ENTRYPOINT ["/usr/bin/tini", "--", "agent-sidecar"]
CMD ["run"]
