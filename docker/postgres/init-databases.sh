#!/usr/bin/env bash
# First start of the postgres service (empty data volume): one database per service, each owned by
# its own login role, closed to everyone else. Passwords come from the environment (.env) and are
# passed as psql variables, never spliced into SQL text.
set -euo pipefail
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
     --set prefect_password="$PREFECT_DB_PASSWORD" --set mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
SQL
echo "init-databases: created databases prefect and mlflow with their own roles"
