"""`squint up` in the foreground: ready, answering, and every part gone after Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from squint.app.client import build_request
from squint.app.stack import STATE_FILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_until_ctrl_c_then_stops_everything(tiny_pack, tmp_path, png):
    import grpc

    from squint.generate.v1 import generate_pb2_grpc

    state = tmp_path / "stack"
    ports = [
        "--port",
        "0",
        "--vision-port",
        "0",
        "--triton-port",
        "0",
        "--triton-http-port",
        "0",
        "--triton-metrics-port",
        "0",
        "--metrics-port",
        "0",
        "--vision-metrics-port",
        "0",
    ]
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "squint",
            "up",
            "--pack",
            str(tiny_pack.root),
            "--state-dir",
            str(state),
            "--redis-url",
            "none",
            *ports,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "squint up exited early:\n" + "".join(lines)
            lines.append(line)
            if "press Ctrl-C to stop" in line:
                break
        output = "".join(lines)
        assert "stack ready" in output and "in-process (no Redis configured)" in output
        recorded = json.loads((state / STATE_FILE).read_text())
        with grpc.insecure_channel(recorded["endpoints"]["orchestrator"]) as channel:
            reply = generate_pb2_grpc.GenerationServiceStub(channel).Generate(
                build_request("What is it?", [png(31)], compressor="avgpool", max_new_tokens=3), timeout=60
            )
        assert len(reply.token_ids) == 3 and reply.usage.media[0].tokens_after == 144
        up.send_signal(signal.SIGINT)
        assert up.wait(90) == 0
        assert not (state / STATE_FILE).exists()
        for name, pid in recorded["pids"].items():
            assert not alive(pid), f"{name} (pid {pid}) outlived squint up"
    finally:
        if up.poll() is None:
            up.kill()
