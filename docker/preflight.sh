#!/bin/sh
# Refuse to start the stack with missing or placeholder secrets (run by the `preflight` service).
# Prints only variable NAMES, never values.
set -eu
status=0
for name in POSTGRES_PASSWORD PREFECT_DB_PASSWORD MLFLOW_DB_PASSWORD PREFECT_API_AUTH_STRING \
            S3_ACCESS_KEY S3_SECRET_KEY; do
    eval "value=\${$name:-}"
    case "$value" in
        "" ) echo "preflight: $name is empty: set it in .env" >&2; status=1 ;;
        *change-me* ) echo "preflight: $name is still the placeholder 'change-me': set it in .env" >&2; status=1 ;;
    esac
done
# Database passwords go inside connection URLs; S3 keys inside SeaweedFS's JSON identity file.
for name in POSTGRES_PASSWORD PREFECT_DB_PASSWORD MLFLOW_DB_PASSWORD; do
    eval "value=\${$name:-}"
    case "$value" in
        *[!A-Za-z0-9._~-]* ) echo "preflight: $name must use URL-safe characters [A-Za-z0-9._~-]" >&2; status=1 ;;
    esac
done
for name in S3_ACCESS_KEY S3_SECRET_KEY; do
    eval "value=\${$name:-}"
    case "$value" in
        *[!A-Za-z0-9._+/=-]* ) echo "preflight: $name must use [A-Za-z0-9._+/=-] only" >&2; status=1 ;;
    esac
done
case "${PREFECT_API_AUTH_STRING:-}" in
    ?*:?* ) ;;
    * ) echo "preflight: PREFECT_API_AUTH_STRING must be 'user:password'" >&2; status=1 ;;
esac
[ "$status" -eq 0 ] && echo "preflight: secrets set"
exit "$status"
