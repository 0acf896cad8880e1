# syntax=docker/dockerfile:1
# MLflow tracking server with the drivers the stack needs: psycopg2 (Postgres backend store) and
# boto3 (artifacts proxied to the S3 store). Command and configuration: docker-compose.yml.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "boto3>=1.34" \
 && useradd --create-home --uid 10001 mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
