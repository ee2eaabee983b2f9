#!/bin/sh
# The compose services' entrypoint: each secret compose mounts under /run/secrets becomes the variable its tool reads,
# in this container's processes only (never in an image, never in compose.env), then the command runs.
set -eu
secrets="${SECRETS_DIR:-/run/secrets}"
load() { # load SECRET VARIABLE [MINIMUM LENGTH]
    if [ -f "$secrets/$1" ]; then
        value=$(cat "$secrets/$1")
        if [ "${#value}" -lt "${3:-1}" ]; then
            echo "the secret $1 is shorter than ${3:-1} characters: run deployments/make-secrets.sh" >&2
            exit 1
        fi
        export "$2=$value"
    fi
}
load mlflow_admin_password MLFLOW_AUTH_ADMIN_PASSWORD 16 # the server makes its admin with it, once
load mlflow_admin_password MLFLOW_TRACKING_PASSWORD 16   # the workers sign in as that admin
load mlflow_flask_secret MLFLOW_FLASK_SERVER_SECRET_KEY 32
load prefect_auth_string PREFECT_SERVER_API_AUTH_STRING 24 # user:password, asked of every API request
load prefect_auth_string PREFECT_API_AUTH_STRING 24
load signing_key LIFECYCLE_SIGNING_KEY 32
exec "$@"
