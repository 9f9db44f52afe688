#!/usr/bin/env bash
# A Python base image made from Debian's packages, for machines that reach a Debian
# mirror but no container registry (so `FROM python:…-slim` can't be pulled).
#
#   images/local-base.sh [NAME]    (default localhost/setlist-base:bookworm)
#
# Debian bookworm minbase with Python 3.11, venv, CA certificates and libgomp (OpenMP,
# which the ALS trainer links against), imported into podman's store. Skipped when the
# image exists: delete it to rebuild. Needs root, debootstrap and podman.
set -euo pipefail
name=${1:-localhost/setlist-base:bookworm}
podman=(podman ${PODMAN_RUNTIME:+--runtime "$PODMAN_RUNTIME"})
if "${podman[@]}" image exists "$name"; then
    echo "$name: present"
    exit 0
fi
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root.log"
tar -C "$root" -c . | "${podman[@]}" import --change 'CMD ["python3"]' - "$name" >/dev/null
echo "$name: built from $mirror"
