"""Faults for the real processes of a local stack: a private Redis to stop and start, and
restarts of a stack's parts on the ports they had (so their clients find them again).

On pytest's path through ``pythonpath = ["tests/support"]`` in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import redis

from llm_worker.tritonserver import TritonServerProcess
from squint.app.stack import GrpcProcess, Stack


@dataclass
class PrivateRedis:
    """A redis-server of the test's own, which a test may stop and start again."""

    port: int
    log: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed (scripts/test installs it)"
        self.process = subprocess.Popen(
            [server, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1].split("/", 1)[0])


def restart_on_same_port(part: GrpcProcess, host: str, timeout: float = 300.0) -> None:
    """Start an exited Squint server again on the port it had, and wait until it is SERVING."""
    assert part._process is not None and part._process.poll() is not None, f"{part.name} is still running"
    argv = list(part.argv)
    argv[argv.index("--port") + 1] = str(part.port)
    part.argv = argv
    part.start()
    part.wait_ready(host, timeout)


def kill_triton(stack: Stack, number: int = 0) -> None:
    """SIGKILL LLM worker ``number``'s tritonserver and its python-backend stubs (its process
    group), as a crash would."""
    triton = stack.tritons[number]
    assert triton is not None and triton.pid is not None and triton.is_running()
    cmdline = Path(f"/proc/{triton.pid}/cmdline").read_bytes().split(b"\0")
    os.killpg(triton.pid, signal.SIGKILL)
    triton._process.wait(30)
    # A crash leaves the python backend's shared-memory regions behind: remove this server's.
    for arg in cmdline:
        if b"shm-region-prefix-name=" in arg:
            prefix = arg.split(b"shm-region-prefix-name=", 1)[1].decode()
            for region in Path("/dev/shm").glob(prefix + "*"):
                with contextlib.suppress(OSError):
                    region.unlink()


def restart_triton(stack: Stack, timeout: float = 300.0) -> None:
    """Start tritonserver again on the ports it had (the orchestrator keeps its address)."""
    old = stack.triton
    assert old is not None and not old.is_running()
    settings = dataclasses.replace(
        old.settings,
        grpc_port=_port_of(old.grpc_url),
        http_port=_port_of(old.http_url),
        metrics_port=_port_of(old.metrics_url.removeprefix("http://")),
    )
    stack.triton = TritonServerProcess(settings)
    stack.triton.start()
    stack.triton.wait_ready(timeout)


def sigterm(part: GrpcProcess) -> None:
    assert part.pid is not None
    os.kill(part.pid, signal.SIGTERM)


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _triton_metrics(stack) -> str:
    return _metrics(stack.triton.metrics_url)


def active_sequences(stack) -> float:
    """Sequences the LLM worker's engines hold (vLLM's and the staged engine's), from Triton's metrics."""
    values = re.findall(r"^squint_llm_active_sequences\{[^}]*\} (\S+)$", _triton_metrics(stack), re.M)
    assert len(values) == 2, "one gauge per model"
    return sum(float(value) for value in values)


def generated_tokens(stack) -> dict[str, float]:
    """Tokens each Triton model has generated so far (squint_llm_generated_tokens_total by model)."""
    pattern = r'^squint_llm_generated_tokens_total\{model="(\w+)"[^}]*\} (\S+)$'
    return {model: float(value) for model, value in re.findall(pattern, _triton_metrics(stack), re.M)}


def llm_request_outcomes(stack) -> dict[str, float]:
    """How the orchestrator's requests to LLM workers ended, summed over the workers, by outcome."""
    text = _metrics(stack.orchestrator_metrics_url)
    outcomes: dict[str, float] = {}
    for outcome, value in re.findall(
        r'^squint_llm_worker_requests_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)$', text, re.M
    ):
        outcomes[outcome] = outcomes.get(outcome, 0.0) + float(value)
    return outcomes


def seconds_until_idle(stack, limit: float = 30.0) -> float:
    """Seconds until the LLM worker holds no sequence (``limit`` when it still holds some then)."""
    started = time.monotonic()
    while active_sequences(stack) > 0 and time.monotonic() - started < limit:
        time.sleep(0.02)
    return time.monotonic() - started
