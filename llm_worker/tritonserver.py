"""Start the real ``tritonserver`` (from the ``nvidia-pytriton`` wheel) on the LLM worker's repository.

In the cluster the NGC ``tritonserver`` image runs the same model repository; on machines
without it, this module prepares what the wheel's binary needs and runs it:

- a backend directory whose ``python/`` holds the wheel's ``libtriton_python.so`` and
  ``triton_python_backend_utils.py`` and, named ``triton_python_backend_stub``, the stub built
  for the *running* Python (the wheel ships one per Python version);
- ``LD_LIBRARY_PATH`` with this interpreter's ``libpython`` directory first (otherwise the stub
  may bind a system ``libpython`` of the same version and a different build), then the
  wheel's ``nvidia_pytriton.libs``;
- this environment's ``bin`` first on ``PATH``: the stub's embedded Python finds its prefix,
  and so the virtualenv's packages (``llm_worker`` included), through the ``python3`` on ``PATH``;
- loopback ports, and a shared-memory prefix of its own so that several servers can run
  on one machine;
- optionally TLS on the KServe gRPC endpoint (``grpc_tls``: a certificate makes it TLS, a
  client CA makes it mutual TLS, as for Squint's own servers), which the orchestrator's
  Triton client reaches with its ``triton_tls`` settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from llm_worker import MODEL_NAME, STAGED_MODEL_NAME, model_repository_path
from squint.rpc import RECONNECT_BACKOFF_MAX_MS, ClientTlsSettings, ServerTlsSettings

logger = logging.getLogger(__name__)

PACK_DIR_ENV = "SQUINT_LLM_PACK_DIR"
_STUB_NAME = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """tritonserver could not be started, exited, or did not become ready; the message says why."""


@dataclass(frozen=True)
class TritonServerSettings:
    """How to run tritonserver for the LLM worker. Ports of 0 are chosen free at start."""

    pack_dir: Path | None = field(default=None, metadata={"help": f"model pack served (sets {PACK_DIR_ENV})"})
    model_repository: Path | None = field(
        default=None, metadata={"help": "model repository; default: the packaged one"}
    )
    model_config_name: str = field(default="", metadata={"help": "'gpu' selects configs/gpu.pbtxt; '' config.pbtxt"})
    models: tuple[str, ...] = field(
        default=(MODEL_NAME, STAGED_MODEL_NAME),
        metadata={
            "help": f"models loaded: {MODEL_NAME} (vLLM) and {STAGED_MODEL_NAME} (in-LLM pooling, reference modes)"
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address every endpoint binds"})
    grpc_port: int = field(default=0, metadata={"help": "KServe gRPC port; 0 = a free one"})
    http_port: int = field(default=0, metadata={"help": "HTTP port; 0 = a free one"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus metrics port; 0 = a free one"})
    run_dir: Path | None = field(default=None, metadata={"help": "backend directory and log; default: a temp dir"})
    log_verbose: int = field(default=0, metadata={"help": "tritonserver --log-verbose level"})
    stop_grace_s: float = field(default=15.0, metadata={"help": "seconds between SIGTERM and SIGKILL"})
    ready_timeout_s: float = field(default=180.0, metadata={"help": "seconds `with` waits for readiness"})
    die_with_parent: bool = field(
        default=True, metadata={"help": "SIGTERM the server when the thread that started it exits (Linux)"}
    )
    grpc_tls: ServerTlsSettings = field(
        default_factory=ServerTlsSettings,
        metadata={
            "help": "TLS on the gRPC endpoint (--grpc-use-ssl); a client CA makes it mutual (--grpc-use-ssl-mutual)"
        },
    )
    probe_tls: ClientTlsSettings = field(
        default_factory=ClientTlsSettings,
        metadata={
            "help": "how the readiness probe connects when grpc_tls is set: the CA, and a client certificate for mTLS"
        },
    )


def tritonserver_dist() -> Path:
    """The ``pytriton/tritonserver`` folder of the installed wheel (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "nvidia-pytriton is not installed; it ships the tritonserver binary (pip install nvidia-pytriton)"
        )
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"{dist}/bin/tritonserver is missing; reinstall nvidia-pytriton")
    return dist


def tritonserver_libs() -> Path:
    """The wheel's bundled shared libraries (``site-packages/nvidia_pytriton.libs``)."""
    return tritonserver_dist().parent.parent / "nvidia_pytriton.libs"


def prepare_backend_directory(root: Path) -> Path:
    """Lay out ``root/backends/python`` for the running Python (idempotent); return ``root/backends``.

    Entries are symlinks into the installed wheel.
    """
    dist = tritonserver_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / _STUB_NAME
    if not stub.is_file():
        shipped = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise TritonServerError(
            f"nvidia-pytriton ships no python backend stub for Python {version} (it has {', '.join(shipped)}); "
            "run with one of those Python versions"
        )
    python_dir = root / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = {
        "libtriton_python.so": dist / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": dist / "backends" / "python" / "triton_python_backend_utils.py",
        _STUB_NAME: stub,
    }
    for name, source in sources.items():
        link = python_dir / name
        if link.is_symlink() and link.readlink() == source:
            continue
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(source)
    return root / "backends"


def tritonserver_env(pack_dir: Path | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver and its python stubs need, on top of ``base`` (``os.environ``)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    lib_paths = [p for p in (libdir, str(tritonserver_libs()), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_paths)
    # sys.prefix, not the resolved executable: a virtualenv's bin holds the python3 whose
    # pyvenv.cfg makes the stub's interpreter see the virtualenv's site-packages.
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.prefix) / "bin"), env.get("PATH", "")) if p)
    if pack_dir is not None:
        env[PACK_DIR_ENV] = str(Path(pack_dir).resolve())
    return env


def tritonserver_command(
    settings: TritonServerSettings, backend_directory: Path, ports: tuple[int, int, int]
) -> list[str]:
    """The tritonserver command line for ``settings``, with (grpc, http, metrics) ``ports`` resolved."""
    s = settings
    grpc_port, http_port, metrics_port = ports
    args = [
        str(tritonserver_dist() / "bin" / "tritonserver"),
        f"--model-repository={s.model_repository or model_repository_path()}",
        f"--backend-directory={backend_directory}",
        f"--grpc-address={s.host}",
        f"--grpc-port={grpc_port}",
        f"--http-address={s.host}",
        f"--http-port={http_port}",
        f"--metrics-address={s.host}",
        f"--metrics-port={metrics_port}",
        f"--log-verbose={s.log_verbose}",
        # Triton's own drain ends before our SIGKILL would.
        f"--exit-timeout-secs={max(int(s.stop_grace_s) - 5, 1)}",
        # A prefix of our own: python-backend regions in /dev/shm must not collide across servers.
        f"--backend-config=python,shm-region-prefix-name=squint_{os.getpid()}_{secrets.token_hex(4)}_",
    ]
    if s.model_config_name:
        args.append(f"--model-config-name={s.model_config_name}")
    # Explicit: only the models asked for load (a repository holds both engines).
    args.append("--model-control-mode=explicit")
    # The configs are complete: auto-completion would start (and import) each model's stub
    # once more before its instance, 5 to 15 s per model on a CPU node.
    args.append("--disable-auto-complete-config")
    args += [f"--load-model={name}" for name in s.models]
    return args + _tls_args(s.grpc_tls)


def _tls_args(tls: ServerTlsSettings) -> list[str]:
    """tritonserver's gRPC TLS flags for ``tls`` (none when it has no certificate)."""
    if not tls.enabled:
        return []
    files = {"grpc_tls.cert_file": tls.cert_file, "grpc_tls.key_file": tls.key_file}
    if tls.client_ca_file:
        files["grpc_tls.client_ca_file"] = tls.client_ca_file
    for name, path in files.items():
        if not path:
            raise TritonServerError(f"TritonServerSettings.{name} is empty; TLS needs a certificate and its key")
    for name, path in files.items():
        if not Path(path).is_file():
            raise TritonServerError(f"TritonServerSettings.{name} is {path}, which is not a readable file")
    args = [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={Path(tls.cert_file).resolve()}",
        f"--grpc-server-key={Path(tls.key_file).resolve()}",
    ]
    if tls.client_ca_file:
        args += [f"--grpc-root-cert={Path(tls.client_ca_file).resolve()}", "--grpc-use-ssl-mutual=true"]
    return args


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (another process may take it before it is bound again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when the parent goes.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class TritonServerProcess:
    """One tritonserver child process serving :data:`MODEL_NAME`.

    ``start()`` then ``wait_ready()``, ``stop()`` at the end; or ``with TritonServerProcess(s) as server:``
    which does all three.
    """

    def __init__(self, settings: TritonServerSettings) -> None:
        self.settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._owned_run_dir: Path | None = None
        self._run_dir: Path | None = None
        self._ports: tuple[int, int, int] | None = None

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the KServe gRPC endpoint (what ``tritonclient.grpc`` takes)."""
        return f"{self.settings.host}:{self._require_ports()[0]}"

    @property
    def http_url(self) -> str:
        return f"{self.settings.host}:{self._require_ports()[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.host}:{self._require_ports()[2]}/metrics"

    @property
    def log_path(self) -> Path:
        """Where the server's stdout and stderr go (a temp run dir is removed after a clean exit)."""
        if self._run_dir is None:
            raise TritonServerError("tritonserver has not been started")
        return self._run_dir / "tritonserver.log"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _require_ports(self) -> tuple[int, int, int]:
        if self._ports is None:
            raise TritonServerError("tritonserver has not been started")
        return self._ports

    def start(self) -> None:
        """Prepare the backend directory and launch tritonserver (returns at once)."""
        if self._process is not None:
            raise TritonServerError("this tritonserver was already started")
        s = self.settings
        if s.run_dir is None:
            self._owned_run_dir = Path(tempfile.mkdtemp(prefix="squint-tritonserver-"))
            self._run_dir = self._owned_run_dir
        else:
            self._run_dir = Path(s.run_dir).resolve()
            self._run_dir.mkdir(parents=True, exist_ok=True)
        prepare_backend_directory(self._run_dir)
        self._ports = (
            s.grpc_port or free_port(s.host),
            s.http_port or free_port(s.host),
            s.metrics_port or free_port(s.host),
        )
        command = tritonserver_command(s, self._run_dir / "backends", self._ports)
        logger.info("starting tritonserver on %s (log %s): %s", self.grpc_url, self.log_path, " ".join(command))
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                env=tritonserver_env(s.pack_dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._run_dir,
                # Its own process group: stop() can kill the server and its python stubs together.
                start_new_session=True,
                preexec_fn=_die_with_parent if s.die_with_parent and sys.platform == "linux" else None,
            )

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, TritonServerError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server and every model of ``settings.models`` are ready over gRPC.

        Raises :class:`TritonServerError` with the log's tail if the process exits first or
        ``timeout`` (default ``settings.ready_timeout_s``) passes.
        """
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if self._process is None:
            raise TritonServerError("tritonserver has not been started")
        timeout = self.settings.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        client = self._probe_client(grpcclient)
        try:
            while True:
                code = self._process.poll()
                if code is not None:
                    raise TritonServerError(
                        f"tritonserver exited with code {code} before it was ready; "
                        f"the end of {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(InferenceServerException):
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in self.settings.models):
                        logger.info("tritonserver ready on %s with %s", self.grpc_url, ", ".join(self.settings.models))
                        return
                if time.monotonic() > deadline:
                    raise TritonServerError(
                        f"tritonserver was not ready with {', '.join(self.settings.models)} within {timeout:.0f} s; "
                        f"the end of {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.25)
        finally:
            client.close()

    def _probe_client(self, grpcclient):
        """A gRPC client of this server for readiness checks, with ``probe_tls`` when the server uses TLS."""
        # Polled while the server starts (tens of seconds): without a cap, gRPC's reconnect backoff
        # would notice it ready only long after it was.
        options = [("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS)]
        if not self.settings.grpc_tls.enabled:
            return grpcclient.InferenceServerClient(self.grpc_url, channel_args=options)
        tls = self.settings.probe_tls
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpcclient.InferenceServerClient(
            self.grpc_url,
            ssl=True,
            root_certificates=tls.ca_file or None,
            private_key=tls.key_file or None,
            certificate_chain=tls.cert_file or None,
            channel_args=options,
        )

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group after ``stop_grace_s``; the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.settings.stop_grace_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "tritonserver (pid %d) did not exit %.0f s after SIGTERM; killing its process group",
                    process.pid,
                    self.settings.stop_grace_s,
                )
                # The leader is not reaped yet, so the group id still names our processes only.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # What outlived the server in its group (vLLM's engine-core processes, which the python
        # stub starts and does not always reap as it exits) goes with it. The group keeps its id
        # while any member lives, so this reaches our processes only.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        logger.info("tritonserver (pid %d) stopped with code %s", process.pid, process.returncode)
        if self._owned_run_dir is not None:
            if process.returncode == 0:
                shutil.rmtree(self._owned_run_dir, ignore_errors=True)
            else:
                logger.warning(
                    "tritonserver exited with code %s; its log stays at %s", process.returncode, self.log_path
                )
            self._owned_run_dir = None
        return process.returncode

    def __enter__(self) -> TritonServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


__all__ = [
    "PACK_DIR_ENV",
    "TritonServerError",
    "TritonServerProcess",
    "TritonServerSettings",
    "prepare_backend_directory",
    "tritonserver_command",
    "tritonserver_env",
]
