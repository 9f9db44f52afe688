#!/usr/bin/env bash
# Build Setlist's images with whichever builder is here: docker (with a running
# engine), podman or buildah.
#
#   images/build.sh [runtime] [gpu]          (default: both)
#
# Settings (environment; `make image` passes its variables of the same names):
#   IMAGE           CPU image name             ghcr.io/setlist/runtime
#   GPU_IMAGE       GPU image name             ghcr.io/setlist/runtime-gpu
#   TAG             tag of both                the project's version (never `latest`:
#                                              the job templates refuse it)
#   BASE_IMAGE      CPU base                   docker.io/library/python:3.12-slim-bookworm
#   GPU_BASE_IMAGE  GPU base (CUDA runtime)    docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04
#   BUILDER         docker | podman | buildah  the first that works
#   PODMAN_RUNTIME  OCI runtime for podman/buildah (e.g. /usr/sbin/runc)
# The host's CA bundle (SSL_CERT_FILE, else Debian's; a TLS-inspecting proxy's CA is in
# it) reaches the build steps as a build secret, never a layer. Prints each image's name, size and build time.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${IMAGE:-ghcr.io/setlist/runtime}
GPU_IMAGE=${GPU_IMAGE:-ghcr.io/setlist/runtime-gpu}
TAG=${TAG:-$version}
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/python:3.12-slim-bookworm}
GPU_BASE_IMAGE=${GPU_BASE_IMAGE:-docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04}
if [ "$TAG" = latest ]; then echo "TAG=latest: the job templates refuse it; pin a version" >&2; exit 2; fi

if [ -z "${BUILDER:-}" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then BUILDER=docker
    elif command -v podman >/dev/null; then BUILDER=podman
    elif command -v buildah >/dev/null; then BUILDER=buildah
    else echo "no docker engine, podman or buildah here" >&2; exit 1
    fi
fi
case $BUILDER in
    docker) build=(docker build); size() { docker image inspect --format '{{.Size}}' "$1"; } ;;
    podman|buildah)
        runtime=(${PODMAN_RUNTIME:+--runtime "$PODMAN_RUNTIME"})
        if [ "$BUILDER" = podman ]; then build=(podman "${runtime[@]}" build)
        else build=(buildah "${runtime[@]}" build --layers); fi
        # the sandboxes these run in often can't raise rlimits or make a build network
        build+=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --network host)
        size() { podman image inspect --format '{{.Size}}' "$1" 2>/dev/null \
                 || buildah inspect --format '{{.Size}}' "$1" 2>/dev/null || echo 0; } ;;
    *) echo "BUILDER=$BUILDER: docker, podman or buildah" >&2; exit 2 ;;
esac
common=(-f images/Dockerfile --target runtime
        --build-arg VERSION="$version"
        --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)")
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}  # what this host trusts
if [ -s "$ca" ]; then
    common+=(--secret "id=ca,src=$ca")
fi

one() {  # name base extras
    local t0=$SECONDS
    "${build[@]}" "${common[@]}" --build-arg BASE_IMAGE="$2" --build-arg EXTRAS="$3" \
        -t "$1:$TAG" . >&2
    local bytes; bytes=$(size "$1:$TAG")
    printf '%s:%s  %d MB  built in %d s\n' "$1" "$TAG" $((bytes / 1000000)) $((SECONDS - t0))
}
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(runtime gpu)
for target in "${targets[@]}"; do
    case $target in
        runtime) one "$IMAGE" "$BASE_IMAGE" "" ;;
        gpu) one "$GPU_IMAGE" "$GPU_BASE_IMAGE" gpu ;;
        *) echo "unknown image $target: runtime or gpu" >&2; exit 2 ;;
    esac
done
