#!/usr/bin/env bash
# Validate docker-compose.yml without a Docker engine, with the placeholder values of .env.example:
# interpolation (every required secret is declared), schema, depends_on conditions, profiles.
#
#   scripts/validate_compose.sh            # exits non-zero on any error
#
# Uses `docker compose` (v2) when present, else Debian's `docker-compose` (v1). Prints nothing of
# the resolved configuration (it would contain the placeholder secrets).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    echo "validate_compose: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 127
fi

# All profiles, so both worker variants are validated too.
for profile in gpu cpu; do
    COMPOSE_PROFILES="$profile" "${compose[@]}" -f docker-compose.yml --env-file .env.example \
        --project-directory "$root" config -q
done
# Without .env the stack must refuse to start: required secrets have no defaults.
empty="$(mktemp)"
trap 'rm -f "$empty"' EXIT
if out="$(env -u POSTGRES_PASSWORD -u PREFECT_DB_PASSWORD -u MLFLOW_DB_PASSWORD \
              -u PREFECT_API_AUTH_STRING -u S3_ACCESS_KEY -u S3_SECRET_KEY \
              "${compose[@]}" -f docker-compose.yml --env-file "$empty" \
              --project-directory "$root" config -q 2>&1)"; then
    echo "validate_compose: the stack validates WITHOUT .env: a required secret has a default" >&2
    exit 1
elif ! grep -q "in .env" <<<"$out"; then
    echo "validate_compose: without .env, compose failed for another reason:" >&2
    echo "$out" >&2
    exit 1
fi
echo "validate_compose: docker-compose.yml OK (${compose[*]}, profiles gpu and cpu)"
