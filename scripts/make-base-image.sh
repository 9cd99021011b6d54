#!/usr/bin/env bash
# Makes a base image for opsfleet's Dockerfile without a registry: debootstrap a minimal
# Debian 12 (bookworm) with Python 3.11 and the tools backups need, then `docker import` it.
#
#   bash scripts/make-base-image.sh [TAG]        default TAG: opsfleet-base:bookworm
#   docker build --build-arg BASE=opsfleet-base:bookworm -t opsfleet .
#
# DOCKER_HOST picks the engine; MIRROR the Debian mirror (default http://deb.debian.org/debian).
# Needs root (debootstrap) and Debian's debootstrap package. Does nothing when TAG exists with
# the same package list.
set -euo pipefail

tag=${1:-opsfleet-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
# What the Dockerfile would otherwise apt-get: Python and venv, pg_dump/pg_restore, zstd;
# python3-gdbm so Celery beat's schedule is one gdbm file (without it shelve falls back to
# dbm.dumb's .dat/.dir files, and the compose file's beat health check looks for the one file).
packages=python3,python3-venv,python3-gdbm,postgresql-client,zstd,ca-certificates

# The package list is kept as a label: a base made with another list is made again.
label=opsfleet.base.packages
have=$(docker image inspect -f "{{ index .Config.Labels \"$label\" }}" "$tag" 2>/dev/null || true)
if [ "$have" = "$packages" ]; then
  echo "make-base-image: $tag is already there"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  echo "make-base-image: debootstrap is missing (apt-get install debootstrap)" >&2
  exit 1
fi

root=$(mktemp -d /var/tmp/opsfleet-base.XXXXXX)
log=$root.log
trap 'rm -rf "$root" "$log"' EXIT
echo "make-base-image: debootstrap bookworm from $mirror into $root (about a minute; log: $log)"
if ! debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  echo "make-base-image: debootstrap failed (log above); is $mirror reachable? set MIRROR to another" >&2
  exit 1
fi
# Package caches are not part of an image.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -c . |
  docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["/bin/bash"]' \
    -c "LABEL $label=$packages" \
    - "$tag" >/dev/null
echo "make-base-image: $tag imported"
