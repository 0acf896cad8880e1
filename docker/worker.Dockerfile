# syntax=docker/dockerfile:1
# GPU worker image: CUDA runtime + CUDA PyTorch + this project, running a Prefect process worker.
# The deployments point flow runs at /opt/pd (PD_CODE_DIR), where the code lives in this image.
#
#   docker compose build worker      (context: repository root; see .dockerignore)
#
# PyTorch wheels bundle their CUDA libraries; the base image supplies a matching userland and the
# host's nvidia-container-toolkit supplies the driver. Pick TORCH_INDEX_URL for the host driver.
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_BASE}

ARG PREFECT_VERSION=3.9.1
ARG MLFLOW_VERSION=3.17.2
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PD_CODE_DIR=/opt/pd \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV" \
 && pip install --upgrade pip

# 1. PyTorch from the CUDA index first: the project's loose `torch>=2.2` is then already met and
#    pip never swaps in another build.
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

# 2. The project's dependencies, cached while pyproject.toml is unchanged; Prefect and MLflow
#    pinned to the servers' versions.
WORKDIR /opt/pd
COPY pyproject.toml ./
#    The `kubernetes` extra too: the same image runs Kubernetes flow-run pods and multi-node JobSet pods.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['kubernetes']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps))" \
 && pip install -r /tmp/requirements.txt "prefect==${PREFECT_VERSION}" "mlflow==${MLFLOW_VERSION}" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 3. The code (flows, tasks, pd_core, deployments), installed in place.
COPY . .
RUN pip install --no-deps -e . \
 && useradd --create-home --uid 10001 pd \
 && mkdir -p /data \
 && chown -R pd:pd /opt/pd /data

USER pd
VOLUME ["/data"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "gpu-pool", "--type", "process", "--install-policy", "never", "--with-healthcheck"]
