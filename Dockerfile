# One image for web, worker and beat (compose/docker-compose.yml picks the command).
# BASE: any Debian 12 image with Python 3.11 (python3, python3-venv); e.g. the official
# python:3.11-slim-bookworm, or one made locally without a registry.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/opsfleet/bin:$PATH \
    OPSFLEET_CONFIG=/etc/opsfleet/opsfleet.yaml \
    PROMETHEUS_MULTIPROC_DIR=/data/metrics

# pg_dump/pg_restore for database backups, zstd and GNU tar for archives.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client zstd tar ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md beat_schedule.py ./
COPY opsfleet opsfleet
COPY worker worker
COPY webhooks webhooks
RUN python3 -m venv /opt/opsfleet \
 && /opt/opsfleet/bin/pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /data opsfleet \
 && mkdir -p /data/metrics /backup \
 && chown -R opsfleet /data /backup

USER opsfleet
WORKDIR /data
EXPOSE 8080
CMD ["gunicorn", "-c", "python:opsfleet.gunicorn_conf", "--bind", "0.0.0.0:8080", "webhooks:create_app()"]
