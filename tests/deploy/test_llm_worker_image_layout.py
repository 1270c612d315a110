"""The LLM worker image's one trick, tried with the real tritonserver.

NGC's tritonserver 24.10 ships a python backend stub for its own Python (3.10); squint needs
3.11. docker/llm-worker.Dockerfile puts pytriton's 3.11 stub (same Triton release, 2.51) in
the model directory, where Triton prefers it. Here the backend directory gets the 3.10 stub,
as in the NGC image, and the model directory the 3.11 one, as in ours: squint_llm must load.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from llm_worker import MODEL_NAME, STAGED_MODEL_NAME, model_repository_path
from llm_worker.tritonserver import free_port, prepare_backend_directory, tritonserver_dist, tritonserver_env

STUB = "triton_python_backend_stub"
DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "llm-worker.Dockerfile"


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.integration
def test_a_model_directory_stub_for_python_3_11_serves_under_a_backend_built_for_3_10(tmp_path, tiny_pack):
    assert f"python_backend_stubs/3.11/{STUB}" in DOCKERFILE.read_text()
    dist = tritonserver_dist()
    backends = prepare_backend_directory(tmp_path)
    ngc_stub = backends / "python" / STUB
    ngc_stub.unlink()
    ngc_stub.symlink_to(dist / "python_backend_stubs" / "3.10" / STUB)

    models = tmp_path / "models"  # the image's COPY llm_worker/model_repository/ /models/
    shutil.copytree(model_repository_path(), models, ignore=shutil.ignore_patterns("__pycache__"))
    for model in (MODEL_NAME, STAGED_MODEL_NAME):
        (models / model / STUB).symlink_to(dist / "python_backend_stubs" / "3.11" / STUB)

    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    command = [
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={models}",
        f"--backend-directory={backends}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics_port}",
        f"--backend-config=python,shm-region-prefix-name=squint_layout_{os.getpid()}_",
        # The staged model is enough to show the stub layout works, and spares loading vLLM.
        "--model-control-mode=explicit",
        "--disable-auto-complete-config",
        f"--load-model={STAGED_MODEL_NAME}",
    ]
    log_path = tmp_path / "tritonserver.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            command,
            env=tritonserver_env(tiny_pack.root),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not _ready(http_port):
            assert server.poll() is None, f"tritonserver exited:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready in 180 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.25)
        assert f"successfully loaded '{STAGED_MODEL_NAME}'" in log_path.read_text()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
