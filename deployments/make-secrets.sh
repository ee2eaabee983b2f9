#!/bin/sh
# The team set-up's secrets (deployments/compose.yaml), each a random value in deployments/secrets/, readable by its
# owner alone. An existing file is kept: run again after deleting one to change it (the MLflow admin's password is
# read once, when its user database is new; change it later through MLflow's update-password API).
set -eu
folder="$(dirname "$0")/secrets"
mkdir -p "$folder"
chmod 700 "$folder"
secret() { # secret NAME PREFIX
    if [ ! -s "$folder/$1" ]; then
        (umask 077 && printf '%s%s' "$2" "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" > "$folder/$1")
        echo "made $folder/$1"
    fi
}
secret mlflow_admin_password ""
secret mlflow_flask_secret ""
secret prefect_auth_string "lifecycle:"
secret signing_key ""
