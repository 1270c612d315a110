"""What every Squint gRPC server shares: error mapping, health, reflection, limits, shutdown.

Servicers stay thin: they raise domain errors (``squint.errors``) and this module's one
interceptor turns them into gRPC statuses. Anything else becomes ``INTERNAL`` with a request
id the operator finds in the log; the client never sees a traceback.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from squint import errors

logger = logging.getLogger(__name__)

# One table, both directions: a domain error raised here becomes this status, and a
# downstream service's status becomes this error again (first match wins on the way back).
STATUS_BY_ERROR: tuple[tuple[type[errors.SquintError], grpc.StatusCode], ...] = (
    (errors.InvalidMedia, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.CompressorNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.BudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.UpstreamUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unsupported, grpc.StatusCode.UNIMPLEMENTED),
)

REQUEST_ID_METADATA = "x-request-id"

# One uncompressed LLaVA-1.5-7B image is 576 x 4096 fp16 = 4.7 MB, above gRPC's usual 4 MiB;
# an Encode reply of 32 such images is 151 MB.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def status_for(error: errors.SquintError) -> grpc.StatusCode:
    for cls, code in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(exc: grpc.aio.AioRpcError | grpc.RpcError, service: str) -> Exception:
    """The error a downstream status stands for: a domain error keeping the message for the
    client, or a plain exception (reported to the client as INTERNAL) when it is our fault."""
    code = exc.code()
    details = exc.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return errors.UpstreamUnavailable(f"{service} is unavailable: {details}")
    for cls, mapped in STATUS_BY_ERROR:
        if mapped == code:
            return cls(details)
    return RuntimeError(f"{service} failed with {code.name}: {details}")


# The id of the call being served: set by the interceptor from the x-request-id metadata (or
# made up), replaced by a servicer that knows better (a request_id field), read back when an
# error is logged, so the id in "internal error (request id ...)" is the one in the logs.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("squint_request_id", default="")


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and value:
            return str(value)[:128]
    return uuid.uuid4().hex[:16]


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to their status and hides everything else behind ``INTERNAL``."""

    def __init__(self, component: str) -> None:
        self._component = component

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.unary_stream is not None:
            # Streaming handlers are async generators, or coroutines that call context.write
            # (as the health service's Watch does): wrap each the way it runs.
            behavior = handler.unary_stream
            wrapped = self._wrap_stream(behavior, method) if inspect.isasyncgenfunction(behavior) else self._wrap_unary(behavior, method)
            return handler._replace(unary_stream=wrapped)
        return handler

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
        if isinstance(exc, errors.SquintError):
            code = status_for(exc)
            logger.info("%s %s -> %s: %s", self._component, method, code.name, exc.message)
            await context.abort(code, exc.message)
        request_id = current_request_id.get() or request_id_of(context)
        logger.error("%s %s failed (request %s)", self._component, method, request_id, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")

    def _wrap_unary(self, behavior, method: str):
        async def unary(request, context):
            current_request_id.set(request_id_of(context))
            try:
                return await behavior(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                await self._abort(context, exc, method)

        return unary

    def _wrap_stream(self, behavior, method: str):
        async def stream(request, context):
            current_request_id.set(request_id_of(context))
            try:
                async for item in behavior(request, context):
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                await self._abort(context, exc, method)

        return stream


@dataclass(frozen=True)
class GrpcServerSettings:
    """How a gRPC server listens."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 in a pod"})
    port: int = field(default=0, metadata={"help": "port to bind; 0 picks a free one"})
    max_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES, metadata={"help": "largest gRPC message sent or received"}
    )
    shutdown_grace_seconds: float = field(
        default=10.0, metadata={"help": "how long in-flight calls may finish after SIGTERM"}
    )


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass
class ServingServer:
    """A started server with its bound port and health servicer."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    service_names: tuple[str, ...] = ()
    settings: GrpcServerSettings = dataclasses.field(default_factory=GrpcServerSettings)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Start listening, reporting NOT_SERVING until :meth:`set_serving` says otherwise."""
        # The health servicer starts out SERVING for ""; a probe must not see that before load.
        await self.set_serving(False)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish for ``grace`` seconds, then stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)


def create_server(
    settings: GrpcServerSettings,
    component: str,
    add_servicers: Callable[[grpc.aio.Server], Iterable[str]],
) -> ServingServer:
    """Build a grpc.aio server with the error interceptor, health and reflection.

    ``add_servicers`` registers the component's servicers and returns their full service
    names. The server is bound (``settings.port`` 0 picks a free port) but not started:
    :meth:`ServingServer.start` starts it NOT_SERVING.
    """
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(component)],
        options=channel_options(settings.max_message_bytes),
    )
    service_names = tuple(add_servicers(server))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"{component}: cannot bind {settings.host}:{settings.port}")
    return ServingServer(server=server, port=port, health=health, service_names=service_names, settings=settings)


async def serve_until_signalled(serving: ServingServer, on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down: draining in-flight calls for up to %.0fs", serving.settings.shutdown_grace_seconds)
    await serving.stop()
    if on_stop is not None:
        await on_stop()
