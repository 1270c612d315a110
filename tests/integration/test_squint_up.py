"""`squint up` in the foreground: ready, answering, and every part gone after Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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
        "--http-port",
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


def _group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def test_down_stops_a_detached_stack_and_every_process_tritonserver_started(tiny_pack, tmp_path):
    state = tmp_path / "stack"
    ports = ["--port", "0", "--http-port", "0", "--vision-port", "0", "--triton-port", "0", "--triton-http-port", "0"]
    ports += ["--triton-metrics-port", "0", "--metrics-port", "0", "--vision-metrics-port", "0"]
    squint = [sys.executable, "-m", "squint"]
    base = ["--pack", str(tiny_pack.root), "--state-dir", str(state), "--redis-url", "none"]
    started = subprocess.run([*squint, "up", "--detach", *base, *ports], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    triton = json.loads((state / STATE_FILE).read_text())["pids"]["tritonserver"]
    assert len(_group_members(triton)) > 1  # tritonserver and the processes it started (stubs, vLLM's engine)
    stopped = subprocess.run([*squint, "down", "--state-dir", str(state)], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 10
    while _group_members(triton) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_members(triton) == [], "processes of tritonserver's group outlived squint down"
    # Unloaded cleanly: a custom metric family outliving the model's finalize segfaulted the stub at
    # its exit (triton-inference-server/server#8662), on every stop.
    assert "Segfault" not in (state / "tritonserver" / "tritonserver.log").read_text()


def test_up_with_two_llm_workers_serves_through_both_and_down_stops_both(tiny_pack, tmp_path, png):
    """`squint up --llm-workers 2`: two tritonservers (the staged engine, no vLLM: this is about the
    processes), both given to the orchestrator; `squint down` stops every one."""
    import grpc

    from squint.generate.v1 import generate_pb2_grpc

    state = tmp_path / "stack"
    ports = ["--port", "0", "--http-port", "-1", "--vision-port", "0", "--triton-port", "0", "--triton-http-port", "0"]
    ports += ["--triton-metrics-port", "0", "--metrics-port", "0", "--vision-metrics-port", "0"]
    squint = [sys.executable, "-m", "squint"]
    base = ["--pack", str(tiny_pack.root), "--state-dir", str(state), "--redis-url", "none", "--engine", "staged"]
    up = [*squint, "up", "--detach", "--llm-workers", "2", *base, *ports]
    started = subprocess.run(up, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        recorded = json.loads((state / STATE_FILE).read_text())
        tritons = [recorded["pids"]["tritonserver"], recorded["pids"]["tritonserver_1"]]
        addresses = recorded["endpoints"]["triton_grpc"].split(", ")
        assert len(set(addresses)) == 2 and all(_group_members(pid) for pid in tritons)
        with grpc.insecure_channel(recorded["endpoints"]["orchestrator"]) as channel:
            stub = generate_pb2_grpc.GenerationServiceStub(channel)
            for n in range(4):  # in turn: two on each worker
                reply = stub.Generate(build_request(f"Question {n}?", [png(41)], max_new_tokens=2), timeout=60)
                assert len(reply.token_ids) == 2
        log = (state / "logs" / "orchestrator.log").read_text()
        assert f"2 LLM worker(s): {', '.join(sorted(addresses))}" in log
        metrics = urllib.request.urlopen(recorded["endpoints"]["orchestrator_metrics"], timeout=10).read().decode()
        for address in addresses:
            line = f'squint_llm_worker_requests_total{{endpoint="{address}",outcome="ok"}} 2.0'
            assert line in metrics, metrics
    finally:
        down = [*squint, "down", "--state-dir", str(state)]
        stopped = subprocess.run(down, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "tritonserver_1" in stopped.stdout, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 10
    while any(_group_members(pid) for pid in tritons) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [_group_members(pid) for pid in tritons] == [[], []], "a tritonserver outlived squint down"
