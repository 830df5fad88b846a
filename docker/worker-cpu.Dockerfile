# syntax=docker/dockerfile:1.7
# The loraplane worker for CPU nodes (tests, small models): torch's CPU build, no CUDA libraries.
# Build from the repository root:  docker build -f docker/worker-cpu.Dockerfile -t loraplane-worker-cpu .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install "build>=1" \
 && python -m venv /opt/loraplane \
 # torch first, from the CPU index: the default index would pull a multi-GB CUDA build.
 && /opt/loraplane/bin/pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY loraplane/ loraplane/
COPY crds/ crds/
COPY localkube/ localkube/
COPY operator/ operator/
COPY worker/ worker/
RUN python -m build --wheel --outdir /dist . \
 && /opt/loraplane/bin/pip install "$(ls /dist/loraplane-*.whl)[worker]" \
 && find /opt/loraplane -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="loraplane-worker-cpu" \
      org.opencontainers.image.description="Serves LoRA adapters of one base model (CPU build)" \
      org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/loraplane /opt/loraplane
ENV PATH=/opt/loraplane/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/cache/loraplane/huggingface
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["loraplane-worker"]
CMD ["--device=cpu"]
