# syntax=docker/dockerfile:1.7
# The loraplane worker on vLLM (--engine vllm) for NVIDIA GPUs: vLLM's own release image (CUDA, torch
# and vLLM as the vLLM project builds and tests them) plus the loraplane wheel. loraplane drives vLLM's
# engine in-process with its own adapter IDs; vLLM's OpenAI server is not used.
# Build from the repository root:  docker build -f docker/worker-vllm.Dockerfile -t loraplane-worker-vllm .
# Supported vLLM releases: see docs/engines.md. Change VLLM_IMAGE only to one listed there.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0

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

FROM ${VLLM_IMAGE} AS runtime
LABEL org.opencontainers.image.title="loraplane-worker-vllm" \
      org.opencontainers.image.description="Serves LoRA adapters of one base model on vLLM, NVIDIA GPUs" \
      org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=wheel /dist /dist
# The wheel's own dependencies and [signing] only (no [worker] extra): torch and transformers are the
# image's, pinned by vLLM. The wheel also registers loraplane's vLLM plugin (the vllm.general_plugins entry point).
RUN python3 -m pip install --no-cache-dir "$(ls /dist/loraplane-*.whl)[signing]" \
 && rm -rf /dist \
 && python3 -c "import vllm, loraplane.worker.vllm.engine"
# VLLM_CACHE_ROOT: vLLM keeps its caches (model info, torch.compile) under ~/.cache/vllm, which uid 10001
# cannot write on a read-only root filesystem; the chart's cache volume can.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/cache/loraplane/huggingface \
    VLLM_CACHE_ROOT=/var/cache/loraplane/vllm \
    VLLM_NO_USAGE_STATS=1
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["loraplane-worker"]
CMD ["--engine=vllm", "--device=cuda"]
