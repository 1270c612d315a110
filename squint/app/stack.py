"""The local stack: Redis (or an in-process cache), tritonserver (one per LLM worker), vision
workers and an orchestrator on loopback, started in order, checked healthy, stopped together.

``squint up`` runs it in the foreground until Ctrl-C; ``squint up --detach`` leaves it running
and records it in ``<state_dir>/stack.json`` for ``squint ask`` and ``squint down``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_worker import MODEL_NAME, STAGED_MODEL_NAME
from llm_worker.tritonserver import TritonServerProcess, TritonServerSettings, free_port
from squint.generate.v1 import generate_pb2
from squint.packs import load_pack

logger = logging.getLogger(__name__)

STATE_FILE = "stack.json"


class StackError(RuntimeError):
    """A part of the stack failed to start; the message carries the end of its log."""


# The LLM models tritonserver loads for each engine choice.
ENGINES = {"vllm": (MODEL_NAME, STAGED_MODEL_NAME), "staged": (STAGED_MODEL_NAME,)}


@dataclass(frozen=True)
class StackSettings:
    """What ``squint up`` starts and where."""

    pack_dir: Path
    state_dir: Path = Path(".squint/stack")
    host: str = "127.0.0.1"
    orchestrator_port: int = 50051
    # The OpenAI-compatible HTTP API of the orchestrator; -1: not served.
    orchestrator_http_port: int = 8080
    vision_port: int = 50061  # the first vision worker's; replicas take the next ports (or 0: free ones)
    vision_workers: int = 1
    orchestrator_metrics_port: int = 9464
    vision_metrics_port: int = 9465  # the first vision worker's; replicas take the next
    # The first LLM worker's tritonserver ports; the other LLM workers take free ones.
    triton_grpc_port: int = 8001
    triton_http_port: int = 8000
    triton_metrics_port: int = 8002
    # LLM worker replicas: one tritonserver each, all given to the orchestrator (static discovery).
    llm_workers: int = 1
    # Empty: no Redis, the vision worker caches in process.
    redis_url: str = "redis://127.0.0.1:6379/0"
    device: str = "cpu"
    # "vllm": both LLM models, vLLM serving all but in-LLM pooling; "staged": Squint's engine alone
    # serves everything (no vLLM loaded: lighter, for machines or tests that do not need it).
    engine: str = "vllm"
    startup_timeout_seconds: float = 300.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.llm_workers < 1:
            raise ValueError(f"llm_workers is {self.llm_workers}; the stack needs at least one LLM worker")

    @classmethod
    def on_free_ports(cls, pack_dir: Path, state_dir: Path, **fields: object) -> StackSettings:
        """A stack whose every port is picked free at start (tests, benchmarks, stacks side by side)."""
        ports = dict.fromkeys(
            (
                "orchestrator_port",
                "orchestrator_http_port",
                "vision_port",
                "orchestrator_metrics_port",
                "vision_metrics_port",
                "triton_grpc_port",
                "triton_http_port",
                "triton_metrics_port",
            ),
            0,
        )
        return cls(pack_dir=pack_dir, state_dir=state_dir, **{**ports, **fields})


GENERATION_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def stop_pid(pid: int, name: str, grace: float = 15.0) -> None:
    """SIGTERM a process, then SIGKILL its whole group after ``grace`` seconds.

    Only the leader gets SIGTERM: tritonserver drains and stops its python stubs itself,
    and signalling the stubs behind its back makes it wait for them. Whatever of its group
    outlives it (vLLM's engine processes, which tritonserver does not wait for) is killed.
    """
    if not _alive(pid):
        _signal_group(pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            logger.info("%s (pid %d) stopped", name, pid)
            _signal_group(pid, signal.SIGKILL)
            return
        time.sleep(0.1)
    logger.warning("%s (pid %d) did not stop within %.0fs; killing it", name, pid, grace)
    _signal_group(pid, signal.SIGKILL)


class GrpcProcess:
    """A Squint gRPC server as a child process, ready when its health service says SERVING."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, port_file: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.port_file = port_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info("started %s (pid %d, log %s)", self.name, self._process.pid, self.log_path)

    def wait_ready(self, host: str, timeout: float, service: str = "") -> None:
        """Until the health service says ``service`` (the whole server by default) is SERVING."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        channel = None
        try:
            while True:
                code = self._process.poll()
                if code is not None:
                    raise StackError(
                        f"{self.name} exited with code {code}; the end of {self.log_path}:\n{_tail(self.log_path)}"
                    )
                if channel is None and self.port_file.is_file() and self.port_file.read_text().strip():
                    channel = grpc.insecure_channel(f"{host}:{self.port}")
                if channel is not None:
                    with contextlib.suppress(grpc.RpcError):
                        request = health_pb2.HealthCheckRequest(service=service)
                        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                if time.monotonic() > deadline:
                    raise StackError(
                        f"{self.name} was not SERVING within {timeout:.0f}s; "
                        f"the end of {self.log_path}:\n{_tail(self.log_path)}"
                    )
                time.sleep(0.2)
        finally:
            if channel is not None:
                channel.close()

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid, self.name)
            with contextlib.suppress(Exception):
                self._process.wait(5)


def _redis_reachable(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError, ValueError):
        return False


@dataclass
class Stack:
    """The started parts of a local stack."""

    settings: StackSettings
    redis_url: str = ""
    cache_note: str = ""
    redis_process: subprocess.Popen[bytes] | None = None
    tritons: list[TritonServerProcess] = field(default_factory=list)  # one per LLM worker
    visions: list[GrpcProcess] = field(default_factory=list)
    orchestrator: GrpcProcess | None = None

    @property
    def triton(self) -> TritonServerProcess | None:
        """The first LLM worker's tritonserver (the only one unless ``llm_workers`` > 1)."""
        return self.tritons[0] if self.tritons else None

    @triton.setter
    def triton(self, process: TritonServerProcess) -> None:
        # A test that restarts the first tritonserver puts the new process in its place.
        if self.tritons:
            self.tritons[0] = process
        else:
            self.tritons.append(process)

    @property
    def llm_addresses(self) -> list[str]:
        """Every LLM worker's KServe gRPC address (``host:port``), in start order."""
        return [t.grpc_url for t in self.tritons]

    @property
    def logs_dir(self) -> Path:
        return self.settings.state_dir / "logs"

    @property
    def orchestrator_address(self) -> str:
        assert self.orchestrator is not None
        return f"{self.settings.host}:{self.orchestrator.port}"

    @property
    def orchestrator_http_url(self) -> str:
        """The OpenAI-compatible API's base URL (``.../v1``); empty when it is not served."""
        path = self.settings.state_dir / "orchestrator.http.port"
        if self.settings.orchestrator_http_port < 0 or not path.is_file():
            return ""
        return f"http://{self.settings.host}:{path.read_text().strip()}/v1"

    @property
    def orchestrator_metrics_url(self) -> str:
        port = (self.settings.state_dir / "orchestrator.metrics.port").read_text().strip()
        return f"http://{self.settings.host}:{port}/metrics"

    @property
    def vision_metrics_urls(self) -> list[str]:
        urls = []
        for number in range(len(self.visions)):
            suffix = "" if number == 0 else f"_{number}"
            port = (self.settings.state_dir / f"vision{suffix}.metrics.port").read_text().strip()
            urls.append(f"http://{self.settings.host}:{port}/metrics")
        return urls

    @property
    def vision_addresses(self) -> list[str]:
        return [f"{self.settings.host}:{v.port}" for v in self.visions]

    @property
    def vision_address(self) -> str:
        return self.vision_addresses[0]

    def endpoints(self) -> dict[str, str]:
        assert self.triton is not None
        return {
            "orchestrator": self.orchestrator_address,
            "openai_http": self.orchestrator_http_url,
            "vision_workers": ", ".join(self.vision_addresses),
            "orchestrator_metrics": self.orchestrator_metrics_url,
            "vision_metrics": ", ".join(self.vision_metrics_urls),
            "triton_grpc": ", ".join(self.llm_addresses),
            "triton_http": ", ".join(t.http_url for t in self.tritons),
            "triton_metrics": ", ".join(t.metrics_url for t in self.tritons),
            "cache": self.cache_note,
        }

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.settings.engine == "staged":
            env["SQUINT_ORCHESTRATOR_TRITON_MODEL"] = STAGED_MODEL_NAME
        env.update(self.settings.extra_env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _start_cache(self) -> None:
        url = self.settings.redis_url
        if not url:
            self.cache_note = "in-process (no Redis configured)"
            return
        if _redis_reachable(url):
            self.redis_url, self.cache_note = url, f"Redis at {url}"
            return
        parsed = urlparse(url)
        server = shutil.which("redis-server")
        if parsed.hostname in ("127.0.0.1", "localhost") and server:
            port = parsed.port or 6379
            log = self.logs_dir / "redis.log"
            self.redis_process = subprocess.Popen(
                [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
                stdout=log.open("ab"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _redis_reachable(url):
                time.sleep(0.1)
            if _redis_reachable(url):
                self.redis_url, self.cache_note = url, f"Redis at {url} (started by squint up)"
                return
            stop_pid(self.redis_process.pid, "redis-server")
            self.redis_process = None
        self.cache_note = f"in-process (Redis at {url} is not reachable)"

    def start(self, detach: bool = False) -> None:
        s = self.settings
        pack = load_pack(s.pack_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._start_cache()
        env = self._child_env()
        python = sys.executable
        try:
            for number in range(s.llm_workers):
                first = number == 0
                triton = TritonServerProcess(
                    TritonServerSettings(
                        pack_dir=pack.root,
                        model_config_name="gpu" if s.device.startswith("cuda") else "",
                        host=s.host,
                        grpc_port=s.triton_grpc_port if first else 0,
                        http_port=s.triton_http_port if first else 0,
                        metrics_port=s.triton_metrics_port if first else 0,
                        run_dir=s.state_dir / ("tritonserver" if first else f"tritonserver_{number}"),
                        die_with_parent=not detach,
                        models=ENGINES[s.engine],
                    )
                )
                triton.start()
                self.tritons.append(triton)
            for number in range(s.vision_workers):
                port = s.vision_port + number if s.vision_port else 0
                suffix = "" if number == 0 else f"_{number}"
                vision = GrpcProcess(
                    f"vision worker {number}",
                    [
                        python,
                        "-m",
                        "squint",
                        "serve",
                        "vision",
                        "--pack",
                        str(pack.root),
                        "--host",
                        s.host,
                        "--port",
                        str(port),
                        "--device",
                        s.device,
                        "--redis-url",
                        self.redis_url,
                        "--port-file",
                        str(s.state_dir / f"vision{suffix}.port"),
                        "--metrics-port",
                        str(s.vision_metrics_port + number if s.vision_metrics_port else 0),
                        "--metrics-port-file",
                        str(s.state_dir / f"vision{suffix}.metrics.port"),
                    ],
                    env,
                    self.logs_dir / f"vision_worker{suffix}.log",
                    s.state_dir / f"vision{suffix}.port",
                )
                vision.start()
                self.visions.append(vision)
            for vision in self.visions:
                vision.wait_ready(s.host, s.startup_timeout_seconds)
            # The orchestrator needs the LLM workers' addresses, not their models: it loads while
            # they do, and its GenerationService turns SERVING once it has seen one ready.
            self.orchestrator = self.orchestrator_process("orchestrator", "orchestrator")
            self.orchestrator.start()
            for triton in self.tritons:
                triton.wait_ready(s.startup_timeout_seconds)
            self.orchestrator.wait_ready(s.host, s.startup_timeout_seconds, service=GENERATION_SERVICE)
        except BaseException:
            self.stop()
            raise
        self._write_state()

    def orchestrator_process(self, name: str, stem: str, extra_env: dict[str, str] | None = None) -> GrpcProcess:
        """An orchestrator (not started) in front of this stack's vision workers and tritonserver: its
        port files ``<state_dir>/<stem>.port`` and ``<stem>.metrics.port``, its log ``logs/<stem>.log``.
        ``extra_env`` on top of the stack's own (``SQUINT_ORCHESTRATOR_*`` settings, say)."""
        assert self.tritons
        s = self.settings
        is_main = stem == "orchestrator"
        return GrpcProcess(
            name,
            [
                sys.executable,
                "-m",
                "squint",
                "serve",
                "orchestrator",
                "--pack",
                str(load_pack(s.pack_dir).root),
                "--host",
                s.host,
                "--port",
                str(s.orchestrator_port if is_main else 0),
                "--vision-workers",
                ",".join(self.vision_addresses),
                "--llm-workers",
                ",".join(self.llm_addresses),
                "--port-file",
                str(s.state_dir / f"{stem}.port"),
                "--metrics-port",
                str(s.orchestrator_metrics_port if is_main else 0),
                "--metrics-port-file",
                str(s.state_dir / f"{stem}.metrics.port"),
                *(
                    [
                        "--http-port",
                        str(s.orchestrator_http_port),
                        "--http-port-file",
                        str(s.state_dir / f"{stem}.http.port"),
                    ]
                    if is_main and s.orchestrator_http_port >= 0
                    else []
                ),
            ],
            {**self._child_env(), **(extra_env or {})},
            self.logs_dir / f"{stem}.log",
            s.state_dir / f"{stem}.port",
        )

    def _write_state(self) -> None:
        pids = {
            "orchestrator": self.orchestrator.pid if self.orchestrator else None,
            **{f"vision_worker_{n}": v.pid for n, v in enumerate(self.visions)},
            **{_triton_name(n): t.pid for n, t in enumerate(self.tritons)},
            "redis-server": self.redis_process.pid if self.redis_process else None,
        }
        state = {"pids": {k: v for k, v in pids.items() if v}, "endpoints": self.endpoints()}
        (self.settings.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def poll_failed(self) -> str | None:
        """The name of a part that has exited, if any."""
        for name, part in (("orchestrator", self.orchestrator), *((v.name, v) for v in self.visions)):
            if part is not None and part._process is not None and part._process.poll() is not None:
                return name
        for number, triton in enumerate(self.tritons):
            if not triton.is_running():
                return _triton_name(number)
        return None

    def stop(self) -> None:
        """Stop every started part, the front door first."""
        for part in (self.orchestrator, *self.visions):
            if part is not None:
                part.stop()
        # Together: each drains for up to its exit timeout.
        _together([triton.stop for triton in self.tritons])
        if self.redis_process is not None:
            stop_pid(self.redis_process.pid, "redis-server")
        (self.settings.state_dir / STATE_FILE).unlink(missing_ok=True)


def _triton_name(number: int) -> str:
    """The name of LLM worker ``number``'s tritonserver in the state file and messages."""
    return "tritonserver" if number == 0 else f"tritonserver_{number}"


def read_state(state_dir: Path) -> dict | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def stop_detached(state_dir: Path) -> list[str]:
    """Stop a stack started with ``--detach``; the names of what was stopped."""
    state = read_state(state_dir)
    if state is None:
        return []
    stopped = []
    pids = state["pids"]
    tritons = sorted(n for n in pids if n.startswith("tritonserver"))
    order = ["orchestrator", *sorted(n for n in pids if n.startswith("vision_worker"))]
    for name in order:
        pid = pids.get(name)
        if pid:
            stop_pid(int(pid), name)
            stopped.append(name)
    # The tritonservers together (each drains for up to its exit timeout), then Redis.
    _together([lambda pid=int(pids[name]), name=name: stop_pid(pid, name) for name in tritons if pids[name]])
    stopped += [name for name in tritons if pids[name]]
    if pids.get("redis-server"):
        stop_pid(int(pids["redis-server"]), "redis-server")
        stopped.append("redis-server")
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def _together(calls: list[Callable[[], object]]) -> None:
    """Run ``calls`` (each stopping a process) at the same time; return when all have."""
    if len(calls) <= 1:
        for call in calls:
            call()
        return
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


__all__ = ["Stack", "StackError", "StackSettings", "free_port", "read_state", "stop_detached"]
