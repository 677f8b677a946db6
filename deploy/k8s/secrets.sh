#!/usr/bin/env bash
# The stack's Secrets for Kubernetes from the .env that `make env` writes, so a cluster gets the
# same secrets as `docker compose up`: backpropagate-token (the token every call carries),
# backpropagate-s3 (MinIO's root pair, which the services use as their S3 credentials) and,
# where HF_TOKEN is set, backpropagate-hf. It prints them (kubectl's client-side dry run, no
# cluster asked); the values never appear on a command line.
#
#   bash deploy/k8s/secrets.sh [ENV_FILE] | kubectl -n backpropagate apply -f -
set -euo pipefail
env_file=${1:-.env}

value_of() { sed -n "s/^$1=//p" "${env_file}" | tail -n 1; }

required() {
    local value
    value=$(value_of "$1")
    if [[ -z "${value}" ]]; then
        echo "${env_file}: $1 is unset; \`make env\` writes a .env with it" >&2
        exit 1
    fi
    printf '%s' "${value}"
}

# NAME, then lines of KEY=VALUE: a Secret printed as YAML.
secret() {
    echo "---"
    kubectl create secret generic "$1" --from-env-file=<(printf '%s\n' "${@:2}") \
        --dry-run=client --output=yaml
}

token=$(required BACKPROPAGATE_TOKEN)
access_key=$(required MINIO_ROOT_USER)
secret_key=$(required MINIO_ROOT_PASSWORD)
secret backpropagate-token "token=${token}"
secret backpropagate-s3 "access-key=${access_key}" "secret-key=${secret_key}"
hf_token=$(value_of HF_TOKEN)
if [[ -n "${hf_token}" ]]; then
    secret backpropagate-hf "token=${hf_token}"
fi
