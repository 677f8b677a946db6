#!/usr/bin/env bash
# Builds, from Debian packages, local stand-ins for the public base images that the Dockerfiles
# and docker-compose.yml name, for a host that reaches a Debian mirror and PyPI but no image
# registry (a locked-down network, an air-gapped mirror, this project's CI machines):
#
#   python:3.11-slim   Debian bookworm (minbase) with Python 3.11 in a venv first on PATH, so that
#                      `python` and `pip` behave as in the official image
#   redis:7-alpine     the same base with Debian's redis-server (7.0), started like the official
#                      image: protected mode off, /data owned by the redis user
#
# They are tagged with the public names, so every Dockerfile and the compose file build and run
# unchanged: an engine pulls an image only when it has none of that name.
# The base trusts the certificate authorities the host added (/usr/local/share/ca-certificates),
# so that pip inside a build reaches PyPI through the same TLS-inspecting proxy as the host.
#
# Usage: deploy/local-base/build.sh [PYTHON_IMAGE [REDIS_IMAGE]]   (as root: debootstrap needs it)
#   (`make images` runs it by itself where it cannot pull the images; the names default to the
#   ones the Dockerfiles and docker-compose.yml use)
#   CONTAINER_ENGINE   docker or podman (default: docker if its daemon answers, else podman)
#   DEBIAN_MIRROR      default http://deb.debian.org/debian
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ENGINE=${CONTAINER_ENGINE:-$(docker info >/dev/null 2>&1 && echo docker || echo podman)}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON_IMAGE=${1:-docker.io/library/python:3.11-slim}
REDIS_IMAGE=${2:-docker.io/library/redis:7-alpine}
VENV=/opt/python

ROOTFS=$(mktemp -d)
trap 'rm -rf "${ROOTFS}"' EXIT

echo ">>> ${PYTHON_IMAGE}: debootstrap bookworm from ${MIRROR} (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "${ROOTFS}" "${MIRROR}" >/dev/null
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "${ROOTFS}/usr/local/share/ca-certificates/"
    chroot "${ROOTFS}" update-ca-certificates >/dev/null 2>&1
fi
chroot "${ROOTFS}" python3 -m venv "${VENV}"
rm -rf "${ROOTFS}"/var/lib/apt/lists/* "${ROOTFS}"/var/cache/apt/*.bin "${ROOTFS}"/var/log/*
tar -C "${ROOTFS}" -c . | "${ENGINE}" import \
    --change "ENV PATH=${VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change 'CMD ["python"]' \
    - "${PYTHON_IMAGE}" >/dev/null

echo ">>> ${REDIS_IMAGE}: Debian's redis-server on that base"
format=()
[[ "${ENGINE}" == podman ]] && format=(--format docker) # OCI images have no HEALTHCHECK
"${ENGINE}" build "${format[@]}" --build-arg "BASE=${PYTHON_IMAGE}" --tag "${REDIS_IMAGE}" \
    "${HERE}/redis" >/dev/null
"${ENGINE}" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
    | grep -E "^(${PYTHON_IMAGE}|${REDIS_IMAGE}) "
