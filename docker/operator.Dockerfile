# syntax=docker/dockerfile:1.7
# The loraplane operator: a wheel built in one stage, installed into a slim runtime as a non-root user.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t loraplane-operator .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install "build>=1"
COPY pyproject.toml README.md ./
COPY loraplane/ loraplane/
COPY crds/ crds/
COPY localkube/ localkube/
COPY operator/ operator/
COPY worker/ worker/
RUN python -m build --wheel --outdir /dist . \
 && python -m venv /opt/loraplane \
 && /opt/loraplane/bin/pip install /dist/loraplane-*.whl \
 && find /opt/loraplane -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="loraplane-operator" \
      org.opencontainers.image.description="Gives every LoRAAdapter a cluster-unique ID and aggregates worker reports" \
      org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/loraplane /opt/loraplane
# USER: kopf names the operator's identity after getpass.getuser(), which fails (KeyError, the operator
# never starts watching) for a uid with no /etc/passwd entry: 10001 here, or whatever uid a cluster assigns.
ENV PATH=/opt/loraplane/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    USER=loraplane
# Numeric uid/gid so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["loraplane-operator"]
