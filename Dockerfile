# agent-sidecar as a container sidecar. Build: docker build -t agent-sidecar .
# Run next to the agent's container, sharing /run/agent-sidecar (the relay socket) and the
# network namespace (agentapi on localhost:3284). Works with a read-only root filesystem.
#
# PYTHON_IMAGE is any Debian-based image with python3 and its venv module: the official
# python image by default, or a local one where Docker Hub cannot be reached (CI builds
# from a debootstrap'd Debian 12 with Debian's python3, see deploy/test/run.sh). Both
# stages install into a venv, because Debian's own python3 refuses a system-wide
# `pip install` (PEP 668, "externally-managed-environment").
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# pip builds the wheel in an isolated environment with the build backend pyproject names.
RUN python3 -m venv /build \
    && /build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist .


FROM ${PYTHON_IMAGE}
# tini reaps children and forwards SIGTERM to the daemon, which then does its final upload.
# tini is not version-pinned: the base image's Debian release fixes it, and a pin would
# break the build at every Debian point release.
# The group is created first, with gid 10001: `useradd --system --user-group` picks a free
# system gid instead (999), and `USER 10001:10001` would then run with a gid that has no
# group entry. Not --system: ids above 999 are outside the system range, and
# useradd and groupadd would warn about it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 sidecar \
    && useradd --uid 10001 --gid 10001 --no-create-home \
       --shell /usr/sbin/nologin sidecar \
    && install -d -m 0700 -o sidecar -g sidecar /run/agent-sidecar
COPY --from=build /dist/ /tmp/dist/
RUN python3 -m venv /opt/agent-sidecar \
    && /opt/agent-sidecar/bin/pip install --no-cache-dir /tmp/dist/*.whl \
    && rm -rf /tmp/dist

ENV PATH=/opt/agent-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AGENT_SIDECAR_SOCKET=/run/agent-sidecar/agent-sidecar.sock \
    AGENT_SIDECAR_LOG_FORMAT=json
# The socket's directory, 0700 and owned by the image's user. Run with another --user, and
# the volume must be that user's instead: see the README ("As a container sidecar").
VOLUME ["/run/agent-sidecar"]
USER 10001:10001
STOPSIGNAL SIGTERM
# Readiness-style: unhealthy while agentapi is unreachable. Docker only marks the
# container, it restarts nothing (Kubernetes probes are in deploy/kubernetes-pod.yaml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["agent-sidecar", "check"]
ENTRYPOINT ["/usr/bin/tini", "--", "agent-sidecar"]
CMD ["run"]
