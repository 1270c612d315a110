# syntax=docker/dockerfile:1.7
# The orchestrator image: Squint's public gRPC front door, CPU only. It also carries the
# `squint` CLI, so the chart's pack init container uses it (`squint pack tiny`).
#
# Build from the repository root (docker/orchestrator.Dockerfile.dockerignore applies):
#   docker build -f docker/orchestrator.Dockerfile -t squint/orchestrator:0.1.0 .

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
FROM python:3.11.11-slim-bookworm
# CPU torch: the CUDA build from PyPI would add several GB the orchestrator never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
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
# gRPC (SQUINT_ORCHESTRATOR_GRPC_PORT) and /metrics (SQUINT_ORCHESTRATOR_METRICS_PORT)
EXPOSE 50051 9464
ENTRYPOINT ["squint"]
CMD ["serve", "orchestrator"]
