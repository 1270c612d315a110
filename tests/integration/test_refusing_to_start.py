"""A server that refuses to start says why in one line, last, and exits non-zero: no traceback
before the reason, none after it (grpc.aio's "Event loop is closed" from a server left started)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVE_ARGS = {
    "vision": ("--device", "cpu", "--redis-url", ""),
    "orchestrator": ("--vision-workers", "127.0.0.1:1", "--triton-url", "127.0.0.1:2"),
}


def serve(component: str, pack: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "squint", "serve", component, "--pack", str(pack)]
    command += ["--port", "0", "--metrics-port", "0", *SERVE_ARGS[component]]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


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
    result = serve(component, pack)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"squint serve: {'' if file is None else f'pack {pack}: '}"), result.stderr
    assert reason in last and str(pack) in last, result.stderr
