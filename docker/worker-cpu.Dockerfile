# syntax=docker/dockerfile:1
# CPU worker image: python:3.11-slim + CPU PyTorch + this project, running a Prefect process
# worker (compose profile `cpu`). Same layout as worker.Dockerfile: code in /opt/pd.
#
#   docker compose --profile cpu build worker-cpu
FROM python:3.11-slim

ARG PREFECT_VERSION=3.9.1
ARG MLFLOW_VERSION=3.17.2
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PD_CODE_DIR=/opt/pd \
    CUDA_VISIBLE_DEVICES="" \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

# 1. CPU PyTorch first (no multi-GB CUDA wheels).
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

# 2. Dependencies, cached while pyproject.toml is unchanged.
WORKDIR /opt/pd
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps))" \
 && pip install -r /tmp/requirements.txt "prefect==${PREFECT_VERSION}" "mlflow==${MLFLOW_VERSION}"

# 3. The code, installed in place.
COPY . .
RUN pip install --no-deps -e . \
 && useradd --create-home --uid 10001 pd \
 && mkdir -p /data \
 && chown -R pd:pd /opt/pd /data

USER pd
VOLUME ["/data"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "gpu-pool", "--type", "process", "--install-policy", "never", "--with-healthcheck"]
