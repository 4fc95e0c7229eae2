# ChatIQ Gateway's container image: the wheel (make dist) in a virtualenv on a
# slim Debian Python, run as a non-root user. `make image` builds it.
#   BASE: any Debian bookworm image with python3 and its venv module; by
#   default the official slim one (make image can make one locally instead).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# The wheel and its dependencies' wheels (make image fetches them first), so
# that the build itself needs no package index.
COPY dist/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/chatiq-gateway/.venv \
 && /opt/chatiq-gateway/.venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      --no-index --find-links /tmp/wheels chatiq-gateway

FROM ${BASE}
RUN useradd --system --uid 10001 --user-group --home-dir /opt/chatiq-gateway --no-create-home chatiq
COPY --from=build /opt/chatiq-gateway/.venv /opt/chatiq-gateway/.venv
# Nothing is written at run time but under /tmp (mount a tmpfs there with a
# read-only root filesystem): no bytecode files, no config written.
ENV PATH=/opt/chatiq-gateway/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0
WORKDIR /opt/chatiq-gateway
USER 10001:10001
EXPOSE 8080 9464
# A drain on SIGTERM: live streams finish within server.shutdown_grace_s.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# Mount the configuration and the ChatIQ key as files:
#   -v ./gateway.toml:/etc/chatiq-gateway/gateway.toml:ro -v ./key:/run/secrets/chatiq-api-key:ro
#   -e CHATIQ_API_KEY_FILE=/run/secrets/chatiq-api-key ... --config /etc/chatiq-gateway/gateway.toml
# Without --config it serves the packaged default (the emulator's address; a demo).
ENTRYPOINT ["chatiq-gateway"]
