# syntax=docker/dockerfile:1
#
# One image for every service of the signup outbox: api, relay, worker and the one-shot
# migrations. compose.yaml picks the process per service with `command:`; the default
# CMD runs the API.
#
#   docker build -t signup-outbox:dev .
#   docker run --rm signup-outbox:dev python -m relay
#   docker run --rm signup-outbox:dev outboxctl --help
#
# The base image is pinned by tag. To pin by digest as well, build with
#   --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- builder: build the project's wheel and install it with its dependencies into a venv ---
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY . .

RUN python -m venv /opt/venv \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

# --- runtime: only the venv, the SQL migrations and an unprivileged user ---
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="signup-outbox" \
      org.opencontainers.image.description="Signup service on the transactional-outbox pattern (api, relay, worker)"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    MIGRATIONS_DIR=/app/sql

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
# The migrations are read from MIGRATIONS_DIR (shared.migrate), not from the installed package.
COPY sql/ /app/sql/

WORKDIR /app
USER 10001:10001

# api: API_PORT; relay and worker: METRICS_PORT (/metrics and /healthz).
EXPOSE 8000 9101 9102

# Every service drains in-flight work on SIGTERM within SHUTDOWN_GRACE_SECONDS; compose's
# stop_grace_period is longer than that, and `init: true` there forwards the signal.
STOPSIGNAL SIGTERM

CMD ["python", "-m", "api_service"]
