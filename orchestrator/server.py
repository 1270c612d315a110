"""Run the orchestrator: the public gRPC front door."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from grpc_health.v1 import health_pb2

from orchestrator.core import Orchestrator
from orchestrator.discovery import create_discovery
from orchestrator.llm_client import TritonLLMClient
from orchestrator.llm_workers import LLMWorkers
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.prompting import PromptBuilder
from orchestrator.service import GenerationServicer
from orchestrator.settings import OrchestratorSettings
from orchestrator.vision_workers import VisionWorkers
from squint.errors import StartupError
from squint.generate.v1 import generate_pb2 as pb
from squint.generate.v1 import generate_pb2_grpc as pb_grpc
from squint.metrics import serve_metrics
from squint.packs import load_pack, reading
from squint.rpc import ServerTlsSettings, ServingServer, create_server, serve_until_signalled

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


def load_prompts(settings: OrchestratorSettings) -> PromptBuilder:
    """The pack's chat template and tokenizer; a pack whose files cannot be loaded is a
    :class:`PackError` naming it."""
    pack = load_pack(settings.pack_dir)
    with reading(pack, f"the tokenizer and chat template ({pack.llava_dir})"):
        return PromptBuilder(pack)


def build_orchestrator(settings: OrchestratorSettings, prompts: PromptBuilder) -> Orchestrator:
    """Wire the core to its clients; call it in the event loop the clients will run in."""
    vision = VisionWorkers(
        create_discovery(settings.discovery),
        settings.grpc.max_message_bytes,
        settings.request_timeout_seconds,
        settings.worker_down_seconds,
        settings.vision_tls,
    )
    metrics = OrchestratorMetrics()

    def connect(url: str) -> TritonLLMClient:
        return TritonLLMClient(
            url,
            settings.triton_model,
            settings.grpc.max_message_bytes,
            settings.request_timeout_seconds,
            settings.triton_tls,
            metrics=metrics,
            staged_model_name=settings.triton_staged_model,
        )

    llm = LLMWorkers(
        create_discovery(settings.llm_endpoints(), "LLM worker", "llm_discovery"),
        connect,
        settings.llm_down_seconds,
        metrics,
        startup_grace_seconds=settings.llm_startup_grace_seconds,
    )
    return Orchestrator(settings, prompts, vision, llm, metrics=metrics)


async def start(
    settings: OrchestratorSettings,
    port_file: Path | None = None,
    metrics_port_file: Path | None = None,
    http_port_file: Path | None = None,
) -> tuple[ServingServer, Orchestrator, HttpServing | None]:
    """Start the orchestrator in this event loop; SERVING (and its port file written) once its
    tokenizer is loaded and, when enabled, the HTTP API listens."""
    prompts = await asyncio.to_thread(load_prompts, settings)
    orchestrator = build_orchestrator(settings, prompts)
    await asyncio.to_thread(orchestrator.vision.start)
    await asyncio.to_thread(orchestrator.llm.start)
    serve_metrics(settings.metrics, orchestrator.metrics.registry, metrics_port_file)
    http = await start_http(settings, orchestrator, http_port_file) if settings.http.enabled else None

    def add(server) -> list[str]:
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(orchestrator), server)
        return [SERVICE_NAME]

    serving = create_server(settings.grpc, "orchestrator", add, auth=settings.auth)
    async with serving.starting():
        if port_file is not None:
            port_file.write_text(str(serving.port))
        await serving.set_serving(True)
    if settings.llm_health_seconds > 0:
        # The process stays SERVING (liveness); the service is SERVING while an LLM worker is ready.
        async def on_llm_ready(ready: bool) -> None:
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            await serving.health.set(SERVICE_NAME, status)

        orchestrator.llm.watch(settings.llm_health_seconds, on_llm_ready)
    logger.info(
        "orchestrator serving on %s (vision workers by %s discovery: %s; LLM workers by %s discovery: %s, "
        "models %s and %s)",
        serving.address,
        settings.discovery.mode,
        ", ".join(sorted(orchestrator.vision.pool.workers)) or "none yet",
        settings.llm_endpoints().mode,
        ", ".join(orchestrator.llm.endpoints) or "none yet",
        settings.triton_model,
        settings.triton_staged_model,
    )
    return serving, orchestrator, http


def http_server(app, host: str, port: int, tls: ServerTlsSettings) -> uvicorn.Server:
    """uvicorn for ``app`` with the gRPC API's TLS: its certificate, and with a client CA, mutual TLS."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        ssl_certfile=tls.cert_file or None,
        ssl_keyfile=tls.key_file or None,
        ssl_ca_certs=tls.client_ca_file or None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE,
    )
    return uvicorn.Server(config)


@dataclass
class HttpServing:
    """The HTTP API's uvicorn server and the task that runs it (kept, so that it is awaited at stop)."""

    server: uvicorn.Server
    task: asyncio.Task
    port: int

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


def playground_examples(settings: OrchestratorSettings) -> Path | None:
    """The folder of example pictures the playground offers: the setting, else the pack's ``examples/``."""
    if settings.http.playground_examples:
        return Path(settings.http.playground_examples)
    folder = settings.pack_dir / "examples"
    return folder if folder.is_dir() else None


def build_http_app(settings: OrchestratorSettings, orchestrator: Orchestrator):
    """The HTTP app the settings ask for: the OpenAI-compatible API and, unless turned off, the playground."""
    from orchestrator.openai_http import create_app
    from orchestrator.playground import add_playground

    pack = load_pack(settings.pack_dir)
    names = tuple(dict.fromkeys(n for n in (settings.http.served_model_name, pack.name, pack.id) if n))
    app = create_app(
        orchestrator,
        names,
        settings.auth.load(),
        settings.http.fetch,
        settings.http.detail_low_tokens,
        orchestrator.metrics,
    )
    if settings.http.playground:
        add_playground(app, playground_examples(settings))
    return app


async def start_http(
    settings: OrchestratorSettings, orchestrator: Orchestrator, port_file: Path | None = None
) -> HttpServing:
    """The HTTP app on uvicorn, in this event loop."""
    app = build_http_app(settings, orchestrator)
    server = http_server(app, settings.http.host, settings.http.port, settings.grpc.tls)
    server.install_signal_handlers = lambda: None  # the gRPC server's handlers stop the process
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it (the port taken, say)
            raise StartupError(f"the HTTP API did not start on {settings.http.host}:{settings.http.port}")
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    if port_file is not None:
        port_file.write_text(str(port))
    page = " (playground at /)" if settings.http.playground else ""
    logger.info("OpenAI-compatible HTTP API on %s:%d%s", settings.http.host, port, page)
    return HttpServing(server, task, port)


async def close(orchestrator: Orchestrator) -> None:
    await orchestrator.vision.close()
    await orchestrator.llm.close()


async def serve(
    settings: OrchestratorSettings,
    port_file: Path | None = None,
    metrics_port_file: Path | None = None,
    http_port_file: Path | None = None,
) -> None:
    serving, orchestrator, http = await start(settings, port_file, metrics_port_file, http_port_file)

    async def stop() -> None:
        if http is not None:
            await http.stop()
        await close(orchestrator)

    await serve_until_signalled(serving, on_stop=stop)
