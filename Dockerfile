# syntax=docker/dockerfile:1
#
# neuroserve images. Two final stages:
#   docker build -t neuroserve:cpu .                  CPU image (the default: the last stage)
#   docker build -t neuroserve:cuda --target cuda .   CUDA 13 + cuDNN 9 image with onnxruntime-gpu
# The models in models/ are baked in at /models; mount a model repository over /models to serve
# other models without rebuilding. Settings come from NEUROSERVE_* environment variables.

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- CUDA: build a virtual environment with onnxruntime-gpu on the same base it runs on -------
# The onnxruntime-gpu wheels on PyPI (1.31) are built for CUDA 13 and cuDNN 9 (their `cuda` extra
# requires nvidia-cuda-runtime~=13.0), which this image carries; the host needs a driver for CUDA 13.
# When moving to another onnxruntime-gpu, match CUDA_IMAGE to its CUDA major version.
# Ubuntu 24.04 brings Python 3.12 (the project needs 3.11 or newer; Ubuntu 22.04 has 3.10).
FROM ${CUDA_IMAGE} AS cuda-build
# Ubuntu's python3 is not pinned to a version: security updates replace old package versions, so a
# pin would break rebuilds; the CUDA image tag pins the Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service ./service
RUN /opt/venv/bin/pip install -c constraints.txt ".[gpu]"

# ---- CUDA runtime image ----------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda
# Unpinned for the same reason as in cuda-build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin neuroserve
COPY --from=cuda-build /opt/venv /opt/venv
COPY models/ /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NEUROSERVE_MODEL_REPOSITORY=/models \
    NEUROSERVE_HOST=0.0.0.0 \
    NEUROSERVE_PORT=8000 \
    NEUROSERVE_GRPC_PORT=8001 \
    NEUROSERVE_PROVIDERS=cuda
USER 10001
# HTTP (REST, /metrics) and V2 gRPC.
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('NEUROSERVE_PORT', '8000'), timeout=2)"]
# exec: the service is PID 1 and receives SIGTERM itself, so it drains before the container stops.
# It listens on 0.0.0.0: repository load/unload answer 403 until API keys are given, e.g.
# -v $PWD/keys.toml:/etc/neuroserve/keys.toml:ro -e NEUROSERVE_API_KEYS_FILE=/etc/neuroserve/keys.toml
# (`neuroserve keys create --file keys.toml --name NAME --scopes infer|admin`).
CMD ["sh", "-c", "exec neuroserve serve --model-repository \"$NEUROSERVE_MODEL_REPOSITORY\" --host \"$NEUROSERVE_HOST\" --port \"$NEUROSERVE_PORT\""]

# ---- CPU: build a virtual environment with onnxruntime ---------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service ./service
RUN /opt/venv/bin/pip install -c constraints.txt ".[cpu]"

# ---- CPU runtime image (default) -------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin neuroserve
COPY --from=cpu-build /opt/venv /opt/venv
COPY models/ /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NEUROSERVE_MODEL_REPOSITORY=/models \
    NEUROSERVE_HOST=0.0.0.0 \
    NEUROSERVE_PORT=8000 \
    NEUROSERVE_GRPC_PORT=8001
USER 10001
# HTTP (REST, /metrics) and V2 gRPC.
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('NEUROSERVE_PORT', '8000'), timeout=2)"]
# exec: the service is PID 1 and receives SIGTERM itself, so it drains before the container stops.
# It listens on 0.0.0.0: repository load/unload answer 403 until API keys are given, e.g.
# -v $PWD/keys.toml:/etc/neuroserve/keys.toml:ro -e NEUROSERVE_API_KEYS_FILE=/etc/neuroserve/keys.toml
# (`neuroserve keys create --file keys.toml --name NAME --scopes infer|admin`).
CMD ["sh", "-c", "exec neuroserve serve --model-repository \"$NEUROSERVE_MODEL_REPOSITORY\" --host \"$NEUROSERVE_HOST\" --port \"$NEUROSERVE_PORT\""]
