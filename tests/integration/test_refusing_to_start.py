"""A server that refuses to start says why in one line, last, and exits non-zero: no traceback
before the reason, none after it (grpc.aio's "Event loop is closed" from a server left started)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVE_ARGS = {
    "vision": ("--device", "cpu", "--redis-url", ""),
    "orchestrator": ("--vision-workers", "127.0.0.1:1", "--triton-url", "127.0.0.1:2"),
}


def serve(
    component: str, pack: Path, port: int = 0, metrics_port: int = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "squint", "serve", component, "--pack", str(pack)]
    command += ["--port", str(port), "--metrics-port", str(metrics_port), *SERVE_ARGS[component]]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def says_why_in_one_line(result: subprocess.CompletedProcess, reason: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert reason in last, result.stderr
    return last


def spoiled(tiny_pack, tmp_path: Path, file: str) -> Path:
    """A copy of the tiny pack with ``file`` overwritten by bytes no loader accepts."""
    root = tmp_path / "pack"
    shutil.copytree(tiny_pack.root, root)
    (root / file).write_text("not what it should be\n")
    return root


@pytest.mark.parametrize(
    ("component", "file", "reason"),
    [
        ("vision", None, "is not a model pack: squint-pack.json is missing"),
        ("vision", "clip/model.safetensors", "cannot load CLIP"),
        ("orchestrator", None, "is not a model pack: squint-pack.json is missing"),
        ("orchestrator", "llava/tokenizer.json", "cannot load the tokenizer and chat template"),
    ],
)
def test_a_server_refusing_its_pack_says_why_in_one_line_and_exits_non_zero(
    tiny_pack, tmp_path, component, file, reason
):
    pack = tmp_path / "nonexistent" if file is None else spoiled(tiny_pack, tmp_path, file)
    last = says_why_in_one_line(serve(component, pack), reason)
    assert last.startswith(f"squint serve: {'' if file is None else f'pack {pack}: '}") and str(pack) in last


@pytest.mark.parametrize(("component", "which"), [("vision", "grpc"), ("orchestrator", "metrics")])
def test_a_server_whose_port_is_taken_says_which_and_exits_non_zero(tiny_pack, component, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"port": port} if which == "grpc" else {"metrics_port": port}
        last = says_why_in_one_line(serve(component, tiny_pack.root, **ports), f"127.0.0.1:{port} ({which}.port)")
    assert "choose another" in last


def test_a_server_whose_tls_key_cannot_be_read_names_the_file(tiny_pack, tmp_path):
    missing = tmp_path / "missing"
    env = {
        "SQUINT_VISION_GRPC_TLS_ENABLED": "true",
        "SQUINT_VISION_GRPC_TLS_CERT_FILE": str(missing / "server.pem"),
        "SQUINT_VISION_GRPC_TLS_KEY_FILE": str(missing / "server.key"),
    }
    says_why_in_one_line(serve("vision", tiny_pack.root, env=env), f"cannot read the TLS key {missing}/server.key")


def test_a_compressor_whose_weights_do_not_load_is_named_with_how_to_deny_it(tiny_pack, tmp_path):
    pack = spoiled(tiny_pack, tmp_path, "stf/model.safetensors")
    last = says_why_in_one_line(serve("vision", pack), "compressor 'stf' of plugin 'builtin.stf'")
    assert f"failed to initialise from {pack}/stf" in last and "SQUINT_VISION_PLUGINS_DENY=builtin.stf" in last
