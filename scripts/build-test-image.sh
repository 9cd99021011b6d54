#!/usr/bin/env bash
# Imports opsfleet's test image (a busybox rootfs) into the test dockerd.
# Nothing can be pulled on these machines, so the image is built from Debian's busybox-static.
# Idempotent: does nothing when the image is already there.
set -euo pipefail

IMAGE=opsfleet-test/busybox:1  # tests/support/servers.py TEST_IMAGE
DOCKER_DIR=${OPSFLEET_TEST_DOCKER_DIR:-/run/opsfleet-test-docker}
DOCKER_HOST=${OPSFLEET_TEST_DOCKER_HOST:-unix://$DOCKER_DIR/docker.sock}
export DOCKER_HOST

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi

# busybox-static's binary has no shared-library needs, so it runs alone in an empty rootfs.
BUSYBOX=/bin/busybox
if ! dpkg -s busybox-static >/dev/null 2>&1; then
  echo "build-test-image: busybox-static is not installed (apt-get install busybox-static)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/bin" "$root/tmp" "$root/www"
chmod 1777 "$root/tmp"
cp "$BUSYBOX" "$root/bin/busybox"
for applet in sh httpd sleep cat echo true false ls mkdir wget kill date env nc tail head grep rm touch; do
  ln -s busybox "$root/bin/$applet"
done

tar -C "$root" -cf "$work/img.tar" .
docker import --change 'ENV PATH=/bin' --change 'CMD ["sh"]' "$work/img.tar" "$IMAGE" >/dev/null
echo "build-test-image: imported $IMAGE into $DOCKER_HOST"
