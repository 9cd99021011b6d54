# One image for web, worker and beat (compose/docker-compose.yml picks the command).
# BASE: any Debian 12 image with Python 3.11 (python3, python3-venv); e.g. the official
# python:3.11-slim-bookworm, or one made without a registry by scripts/make-base-image.sh
# (docker build --build-arg BASE=opsfleet-base:bookworm). Offline (no package index
# reachable): put wheels of opsfleet and its dependencies in ./wheels (pip wheel . -w wheels),
# and they are used alone.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/opsfleet/bin:$PATH \
    OPSFLEET_CONFIG=/etc/opsfleet/opsfleet.yaml \
    PROMETHEUS_MULTIPROC_DIR=/data/metrics

# pg_dump/pg_restore for database backups, zstd and GNU tar for archives: installed when
# the base lacks them (scripts/make-base-image.sh's base has them already).
RUN if ! command -v pg_dump >/dev/null || ! command -v zstd >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends postgresql-client zstd tar ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
# wheel[s]: the files of ./wheels when the context has that folder (offline builds), else nothing.
COPY pyproject.toml README.md beat_schedule.py wheel[s] ./
COPY opsfleet opsfleet
COPY worker worker
COPY webhooks webhooks
RUN python3 -m venv /opt/opsfleet \
 && if ls ./opsfleet-*.whl >/dev/null 2>&1; then what="--no-index --find-links=. opsfleet"; else what="."; fi \
 && /opt/opsfleet/bin/pip install --no-cache-dir $what \
 && rm -f ./*.whl \
 && useradd --system --uid 10001 --home-dir /data opsfleet \
 && mkdir -p /data/metrics /backup \
 && chown -R opsfleet /data /backup

USER opsfleet
WORKDIR /data
EXPOSE 8080
CMD ["gunicorn", "-c", "python:opsfleet.gunicorn_conf", "--bind", "0.0.0.0:8080", "webhooks:create_app()"]
