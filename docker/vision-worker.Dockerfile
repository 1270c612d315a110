# syntax=docker/dockerfile:1.7
# The vision worker image: CLIP, the compressor plugins and the projector on an NVIDIA GPU.
#
# torch==2.13.0 from PyPI is the CUDA 13.0 build; it brings the CUDA libraries it needs as
# wheels (cuda-toolkit, cuDNN, NCCL), so the base only has to be a CUDA image the NVIDIA
# container toolkit recognises (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES). Nodes
# need a driver that runs CUDA 13.0 (R580 or newer). Another build: --build-arg
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (with a driver for that CUDA).
#
# Build from the repository root (docker/vision-worker.Dockerfile.dockerignore applies):
#   docker build -f docker/vision-worker.Dockerfile -t squint/vision-worker:0.1.0 .

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
FROM nvidia/cuda:13.0.0-base-ubuntu22.04
ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Python 3.11 (squint requires >=3.11,<3.12) from the deadsnakes archive: Ubuntu 22.04 ships 3.10.
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
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && pip install --constraint /tmp/constraints.txt /tmp/wheels/squint-0.1.0-py3-none-any.whl \
 && rm -rf /tmp/wheels /tmp/constraints.txt \
 && groupadd --system --gid 10001 squint \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/squint --create-home --shell /usr/sbin/nologin squint
USER 10001:10001
WORKDIR /home/squint
# gRPC (SQUINT_VISION_GRPC_PORT) and /metrics (SQUINT_VISION_METRICS_PORT)
EXPOSE 50061 9465
ENTRYPOINT ["squint"]
CMD ["serve", "vision"]
