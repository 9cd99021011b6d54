#!/usr/bin/env bash
# Makes this machine ready for opsfleet's test suite: Debian packages, the shared PostgreSQL and
# Redis, a private dockerd and the test image. Idempotent and quiet: it only prints what it did.
# A fresh machine has none of it, so CI runs this before the tests.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DOCKER_DIR=${OPSFLEET_TEST_DOCKER_DIR:-/run/opsfleet-test-docker}
DOCKER_DATA=${OPSFLEET_TEST_DOCKER_DATA:-/var/lib/opsfleet-test-docker}
DOCKER_HOST="unix://$DOCKER_DIR/docker.sock"
failed=0

# One run at a time: two runs racing would start two dockerds on the same pidfile.
mkdir -p "$DOCKER_DIR"
exec 9>"$DOCKER_DIR/services.lock"
flock -w 300 9 || { echo "services: ERROR: another scripts/services.sh still holds $DOCKER_DIR/services.lock" >&2; exit 1; }

log() { echo "services: $*"; }
err() { echo "services: ERROR: $*" >&2; failed=1; }

# wait_until SECONDS CMD...: retries CMD every 0.5 s, returns 1 when time runs out.
wait_until() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# --- Debian packages --------------------------------------------------------------------------
# Each package is checked by what the tests use from it: postgresql-client is a metapackage
# that may be absent while a versioned client (postgresql-client-15) provides pg_dump.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
command -v prometheus >/dev/null || missing+=(prometheus)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v pg_dump >/dev/null || missing+=(postgresql-client)
command -v logrotate >/dev/null || missing+=(logrotate)  # bench/rotation compares with it
command -v zstd >/dev/null || missing+=(zstd)  # rotation tests check .zst files with the zstd tool too
command -v chromium >/dev/null || missing+=(chromium)  # the status page's headless browser test
command -v chromedriver >/dev/null || missing+=(chromium-driver)  # ...driven over WebDriver by selenium
command -v debootstrap >/dev/null || missing+=(debootstrap)  # the base of opsfleet's own image (tests/test_image.py)
command -v docker-registry >/dev/null || missing+=(docker-registry)  # deploys pull from a real registry
command -v htpasswd >/dev/null || missing+=(apache2-utils)  # ...behind htpasswd auth (tests/support/registry.py)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt_log=$(mktemp)
  # Recommends stay on: docker.io's (cgroupfs-mount, apparmor, tini...) are what dockerd was checked with.
  if ! { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y -qq "${missing[@]}"; } >"$apt_log" 2>&1; then
    tail -n 30 "$apt_log" >&2
    rm -f "$apt_log"
    echo "services: ERROR: apt-get install ${missing[*]} failed" >&2
    exit 1
  fi
  rm -f "$apt_log"
fi

# --- shared PostgreSQL on 127.0.0.1:5432 --------------------------------------------------------
pg_up() { timeout 5 pg_isready -q -h 127.0.0.1 -p 5432; }
if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ] && [ -n "$(ls /etc/postgresql)" ]; then
    log "starting PostgreSQL at 127.0.0.1:5432"
    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start || true
    wait_until 30 pg_up || err "PostgreSQL at 127.0.0.1:5432 did not start (see /var/log/postgresql/)"
  else
    err "PostgreSQL at 127.0.0.1:5432 is not answering and no PostgreSQL server is installed here"
  fi
fi

# --- shared Redis on 127.0.0.1:6379 -------------------------------------------------------------
redis_up() { [ "$(timeout 5 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  redis_up 2>/dev/null || err "Redis at 127.0.0.1:6379 is not answering and redis-server/redis-cli are not installed here"
elif ! redis_up; then
  log "starting Redis at 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_until 15 redis_up || err "Redis at 127.0.0.1:6379 did not start (see /var/log/redis/ci.log)"
fi

# --- private dockerd for the tests ---------------------------------------------------------------
docker_up() { timeout 10 docker -H "$DOCKER_HOST" version; }
# running PID: the process exists and is not a zombie (a killed dockerd may linger as one:
# this machine's pid 1 reaps late, and kill -0 still succeeds on a zombie).
running() { [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
if ! docker_up >/dev/null 2>&1; then
  mkdir -p "$DOCKER_DATA"
  pid=$(cat "$DOCKER_DIR/dockerd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
    # Still starting: a second dockerd would refuse to run beside it.
    log "waiting for dockerd (pid $pid) at $DOCKER_HOST"
  else
    # dockerd refuses to start while the pid in its stale pidfile exists, and waits for a
    # containerd whose stale pidfile names a live pid: a zombie counts as live for both.
    for pidfile in "$DOCKER_DIR/dockerd.pid" "$DOCKER_DIR/exec/containerd/containerd.pid"; do
      old=$(cat "$pidfile" 2>/dev/null || true)
      if [ -n "$old" ] && ! running "$old"; then rm -f "$pidfile"; fi
    done
    log "starting dockerd at $DOCKER_HOST (log: $DOCKER_DIR/dockerd.log)"
    # setsid + nohup: it must outlive this script and the shell that ran it.
    setsid nohup dockerd --data-root "$DOCKER_DATA" --exec-root "$DOCKER_DIR/exec" \
      -H "$DOCKER_HOST" --pidfile "$DOCKER_DIR/dockerd.pid" --iptables=false --bridge=none \
      >>"$DOCKER_DIR/dockerd.log" 2>&1 </dev/null 9>&- &  # 9>&-: dockerd must not keep the lock
    pid=$!
  fi
  deadline=$((SECONDS + 60))
  until docker_up >/dev/null 2>&1; do
    if ! running "$pid" || ((SECONDS >= deadline)); then
      tail -n 30 "$DOCKER_DIR/dockerd.log" >&2 || true
      echo "services: ERROR: dockerd at $DOCKER_HOST did not come up (log above)" >&2
      exit 1
    fi
    sleep 0.5
  done
fi

# --- test image ----------------------------------------------------------------------------------
OPSFLEET_TEST_DOCKER_HOST=$DOCKER_HOST bash "$here/build-test-image.sh"
# opsfleet's own image builds on this (tests/test_image.py); about a minute, once per dockerd.
DOCKER_HOST=$DOCKER_HOST bash "$here/make-base-image.sh" opsfleet-base:bookworm || err "the base image for opsfleet's Dockerfile could not be made"

exit "$failed"
