#!/usr/bin/env bash
# Writes a .env for `docker compose up` with fresh secrets: the stack's token and MinIO's root
# credentials at random, then the lines of .env.example (COMPOSE_PROFILES=cpu among them). An
# existing .env is kept: its secrets may already be in MinIO's volume and in clients'
# environments; one written before the compose file had profiles gets the COMPOSE_PROFILES line
# added, without which `docker compose up` would start neither variant of the trainer.
#
#   bash deploy/write-env.sh [DEST] [EXAMPLE]     (default: .env .env.example; `make env`)
set -euo pipefail
dest=${1:-.env}
example=${2:-.env.example}
if [[ -e "${dest}" ]]; then
    if grep -q -E '^COMPOSE_PROFILES=' "${dest}"; then
        echo "${dest} exists; kept as it is"
    else
        [[ -z "$(tail -c 1 "${dest}")" ]] || echo >>"${dest}" # ends its last line first
        grep -E '^COMPOSE_PROFILES=' "${example}" >>"${dest}"
        echo "${dest} exists; kept, with $(grep -E '^COMPOSE_PROFILES=' "${example}") added"
    fi
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
