#!/usr/bin/env bash
# Writes a .env for `docker compose up` with fresh secrets: the stack's token and MinIO's root
# credentials at random, then the optional lines of .env.example. An existing .env is kept: its
# secrets may already be in MinIO's volume and in clients' environments.
#
#   bash deploy/write-env.sh [DEST] [EXAMPLE]     (default: .env .env.example; `make env`)
set -euo pipefail
dest=${1:-.env}
example=${2:-.env.example}
if [[ -e "${dest}" ]]; then
    echo "${dest} exists; kept as it is"
    exit 0
fi
umask 077 # secrets: readable by their owner only
secret() { python3 -c 'import secrets, sys; print(secrets.token_urlsafe(int(sys.argv[1])))' "$1"; }
{
    echo "BACKPROPAGATE_TOKEN=$(secret 32)"
    echo "MINIO_ROOT_USER=backpropagate"
    echo "MINIO_ROOT_PASSWORD=$(secret 24)"
    grep -v -E '^(BACKPROPAGATE_TOKEN|MINIO_ROOT_USER|MINIO_ROOT_PASSWORD)=$' "${example}"
} >"${dest}.partial"
mv "${dest}.partial" "${dest}"
echo "wrote ${dest}: a fresh token and MinIO credentials"
