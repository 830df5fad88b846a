# syntax=docker/dockerfile:1.7
# The loraplane worker for NVIDIA GPUs. The wheel is built on a slim Python image; the virtualenv is built
# on the same CUDA base it runs on (so its interpreter path matches), then copied into a clean runtime stage.
# Build from the repository root:  docker build -f docker/worker-cuda.Dockerfile -t loraplane-worker-cuda .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# The stage that builds the loraplane wheel (pure Python: any Python >= 3.11 image builds the same wheel).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install "build>=1"
COPY pyproject.toml README.md ./
COPY loraplane/ loraplane/
COPY crds/ crds/
COPY localkube/ localkube/
COPY operator/ operator/
COPY worker/ worker/
RUN python -m build --wheel --outdir /dist .

FROM ${CUDA_IMAGE} AS venv
ARG TORCH_VERSION=2.13.0
# The CUDA build of torch matching the base image's CUDA (12.8).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/loraplane \
 && /opt/loraplane/bin/pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY --from=wheel /dist /dist
RUN /opt/loraplane/bin/pip install "$(ls /dist/loraplane-*.whl)[worker]" \
 && find /opt/loraplane -name '__pycache__' -prune -exec rm -rf {} +

FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="loraplane-worker-cuda" \
      org.opencontainers.image.description="Serves LoRA adapters of one base model on NVIDIA GPUs" \
      org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=venv /opt/loraplane /opt/loraplane
ENV PATH=/opt/loraplane/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/cache/loraplane/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["loraplane-worker"]
CMD ["--device=cuda"]
