"""What every Squint gRPC server shares: error mapping, health, reflection, limits, shutdown.

Servicers stay thin: they raise domain errors (``squint.errors``) and this module's one
interceptor turns them into gRPC statuses. Anything else becomes ``INTERNAL`` with a request
id the operator finds in the log; the client never sees a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import hmac
import inspect
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.UpstreamUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
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
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return errors.UpstreamUnavailable(f"{service} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # Slow is not dead: no failover, the client hears its deadline passed.
        return errors.DeadlineExceeded(f"{service} did not answer before the deadline")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return RuntimeError(f"{service}: a message exceeded the gRPC size limit: {details}")
    for cls, mapped in STATUS_BY_ERROR:
        if mapped == code:
            return cls(details)
    return RuntimeError(f"{service} failed with {code.name}: {details}")


# The id of the call being served: set by the interceptor from the x-request-id metadata (or
# made up), replaced by a servicer that knows better (a request_id field), read back when an
# error is logged, so the id in "internal error (request id ...)" is the one in the logs.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("squint_request_id", default="")


def call_timeout(limit_seconds: float, deadline: float | None, what: str) -> float:
    """The timeout of one downstream call: ``limit_seconds``, or less when the client's
    ``deadline`` (``time.monotonic()``) comes sooner; :class:`DeadlineExceeded` once it passed."""
    if deadline is None:
        return limit_seconds
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.DeadlineExceeded(f"the request's deadline passed before {what}")
    return min(limit_seconds, left)


# Who is calling, for per-client limits: set by the token interceptor to the matching token's
# identity (a hash, never the token); empty when the server takes no tokens.
current_client: contextvars.ContextVar[str] = contextvars.ContextVar("squint_client", default="")


def client_identity(context: grpc.aio.ServicerContext) -> str:
    """The caller: its bearer token's identity when the server authenticates, else its peer
    host (without the port, so new connections do not make a new client)."""
    if current_client.get():
        return current_client.get()
    peer = context.peer() or "unknown"
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rpartition(":")[0] or address
    return f"peer {kind}:{address}" if address else f"peer {peer}"


class _Undecodable:
    """Stands for request bytes that are not the method's message (see ``_lenient``)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # grpc answers UNKNOWN, with the parser's exception text, when a deserializer raises; the
    # servicer wrapper turns this marker into INVALID_ARGUMENT instead.
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's malformed request
            return _Undecodable(exc)

    return deserialize


def _check_decoded(request: Any, method: str) -> None:
    if isinstance(request, _Undecodable):
        raise errors.InvalidRequest(f"the request is not a valid message for {method} (it could not be parsed)")


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and value:
            return str(value)[:128]
    return uuid.uuid4().hex[:16]


class _CallPolicy(grpc.aio.ServerInterceptor):
    """The one wrapping of server calls that Squint's interceptors share: each unary-request call
    of a service not in ``exempt`` runs inside :meth:`around`, which a subclass supplies.

    :meth:`around` is entered before the method runs and left when it returns, raises or (a
    stream) ends; it may abort the call before it starts, or turn an error into a status. A
    unary-stream method is an async generator, or a coroutine that calls ``context.write`` (as
    the health service's Watch does); a generator is served as such a coroutine, which writes each
    item and closes the generator when the call ends, however it ends.
    """

    def __init__(self, exempt: tuple[str, ...] = ()) -> None:
        self._exempt = exempt

    def around(
        self, details: grpc.HandlerCallDetails, request: Any, context: grpc.aio.ServicerContext
    ) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.lstrip("/").split("/")[0] in self._exempt:
            return handler
        policy = functools.partial(self.around, handler_call_details)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_call_within(handler.unary_unary, policy))
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):
                return handler._replace(unary_stream=_stream_within(behavior, policy))
            return handler._replace(unary_stream=_call_within(behavior, policy))
        return handler


def _call_within(behavior, policy):
    async def call(request, context):
        async with policy(request, context):
            return await behavior(request, context)

    return call


def _stream_within(behavior, policy):
    # A coroutine that writes, not a generator that yields: grpc never closes a handler's generator
    # (a call cancelled while a write waits leaves it at its ``yield`` until the garbage collector
    # finds it, and the work behind it, an LLM request, goes on). Closed here, it ends with the call.
    async def stream(request, context):
        async with policy(request, context), contextlib.aclosing(behavior(request, context)) as items:
            async for item in items:
                await context.write(item)

    return stream


class ErrorMappingInterceptor(_CallPolicy):
    """Maps domain errors to their status and hides everything else behind ``INTERNAL``."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self._component = component

    async def intercept_service(self, continuation, handler_call_details):
        handler = await super().intercept_service(continuation, handler_call_details)
        if handler is not None and handler.request_deserializer is not None:
            if handler.unary_unary or handler.unary_stream:
                handler = handler._replace(request_deserializer=_lenient(handler.request_deserializer))
        return handler

    @contextlib.asynccontextmanager
    async def around(self, details, request, context):
        current_request_id.set(request_id_of(context))
        try:
            _check_decoded(request, details.method)
            yield
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
            await self._abort(context, exc, details.method)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
        if isinstance(exc, errors.SquintError):
            code = status_for(exc)
            logger.info("%s %s -> %s: %s", self._component, method, code.name, exc.message)
            await context.abort(code, exc.message)
        request_id = current_request_id.get() or request_id_of(context)
        logger.error("%s %s failed (request %s)", self._component, method, request_id, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


@dataclass(frozen=True)
class ServerTlsSettings:
    """TLS for a server: a certificate makes it TLS; a client CA makes it mutual TLS."""

    cert_file: str = field(default="", metadata={"help": "PEM certificate chain; empty serves plaintext"})
    key_file: str = field(default="", metadata={"help": "PEM private key of cert_file"})
    client_ca_file: str = field(
        default="", metadata={"help": "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"}
    )

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class ClientTlsSettings:
    """TLS for a client: trust a CA, and optionally present a certificate (mTLS)."""

    enabled: bool = field(default=False, metadata={"help": "connect with TLS"})
    ca_file: str = field(default="", metadata={"help": "PEM CA bundle to verify the server; empty: the system roots"})
    cert_file: str = field(default="", metadata={"help": "PEM client certificate, for mutual TLS"})
    key_file: str = field(default="", metadata={"help": "PEM private key of cert_file"})
    server_name: str = field(
        default="", metadata={"help": "expected name in the server certificate, when not the host"}
    )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise errors.StartupError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(tls: ServerTlsSettings) -> grpc.ServerCredentials:
    if not tls.key_file:
        raise ValueError("TLS: cert_file is set but key_file is empty")
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "TLS key"), _read(tls.cert_file, "TLS certificate"))],
        root_certificates=_read(tls.client_ca_file, "client CA") if tls.client_ca_file else None,
        require_client_auth=bool(tls.client_ca_file),
    )


def client_channel(target: str, tls: ClientTlsSettings, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target``, with TLS (and a client certificate) when configured."""
    if not tls.enabled:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "CA") if tls.ca_file else None,
        private_key=_read(tls.key_file, "client key") if tls.cert_file else None,
        certificate_chain=_read(tls.cert_file, "client certificate") if tls.cert_file else None,
    )
    if tls.server_name:
        options = [*options, ("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.aio.secure_channel(target, credentials, options=options)


@dataclass(frozen=True)
class AuthSettings:
    """Bearer tokens the public API accepts; none configured means no authentication."""

    tokens: tuple[str, ...] = field(default=(), metadata={"help": "accepted bearer tokens (prefer tokens_file)"})
    tokens_file: str = field(
        default="", metadata={"help": "a file of accepted tokens, one per line (a mounted Secret)"}
    )

    def load(self) -> tuple[bytes, ...]:
        tokens = list(self.tokens)
        if self.tokens_file:
            tokens += [
                line.strip() for line in _read(self.tokens_file, "tokens file").decode().splitlines() if line.strip()
            ]
        return tuple(token.encode() for token in tokens)


# Probes cannot send credentials: the health service stays open.
AUTH_EXEMPT_SERVICES = ("grpc.health.v1.Health",)


class TokenAuthInterceptor(_CallPolicy):
    """Requires ``authorization: Bearer <token>`` matching one of the configured tokens, and
    sets :data:`current_client` to the token's identity while the call runs."""

    def __init__(self, tokens: tuple[bytes, ...], exempt: tuple[str, ...] = AUTH_EXEMPT_SERVICES) -> None:
        super().__init__(exempt)
        self._tokens = tokens

    def _identity(self, metadata) -> str | None:
        """The identity of the accepted token presented, or None when none is."""
        for key, value in metadata or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                presented = token.strip().encode()
                # Compare against every token so timing does not say which one nearly matched.
                matches = [hmac.compare_digest(presented, t) for t in self._tokens]
                if scheme.lower() == "bearer" and any(matches):
                    return "token " + hashlib.sha256(presented).hexdigest()[:12]
                return None
        return None

    @contextlib.asynccontextmanager
    async def around(self, details, request, context):
        identity = self._identity(details.invocation_metadata)
        if identity is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization metadata)"
            )
        current_client.set(identity)
        yield


class DrainGate(_CallPolicy):
    """Counts the calls in flight and, once :meth:`close` d for shutdown, refuses new ones with
    ``UNAVAILABLE`` before they start, so a client knows to retry (on another replica).

    The health service passes: probes must read NOT_SERVING, and a Watch never ends by itself.
    """

    def __init__(self, component: str, exempt: tuple[str, ...] = AUTH_EXEMPT_SERVICES) -> None:
        super().__init__(exempt)
        self._component = component
        self._closed = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def close(self) -> None:
        self._closed = True

    async def drained(self, timeout: float) -> bool:
        """Whether every call in flight ended within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def around(self, details, request, context):
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the {self._component} is shutting down; retry the call")
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()


@dataclass(frozen=True)
class GrpcServerSettings:
    """How a gRPC server listens."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 in a pod"})
    port: int = field(default=0, metadata={"help": "port to bind; 0 picks a free one"})
    max_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metadata={"help": "largest gRPC message this process sends, or receives as a client of another service"},
    )
    max_receive_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metadata={
            "help": "largest request a client may send this server; a larger one is refused with RESOURCE_EXHAUSTED"
        },
    )
    shutdown_grace_seconds: float = field(
        default=10.0, metadata={"help": "how long in-flight calls may finish after SIGTERM"}
    )
    tls: ServerTlsSettings = field(default_factory=ServerTlsSettings)


# gRPC's reconnect backoff grows to 120 s: a channel whose server was down for a minute would
# find it back only tens of seconds after it returned. Capped, a restarted server (Triton, a
# vision worker) is reached again within this many milliseconds.
RECONNECT_BACKOFF_MAX_MS = 2000


def channel_options(max_message_bytes: int, max_receive_message_bytes: int | None = None) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        (
            "grpc.max_receive_message_length",
            max_message_bytes if max_receive_message_bytes is None else max_receive_message_bytes,
        ),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]


# After the drain, how long stop() gives calls that arrived as the gate closed (they are refused
# at once) and health watches (which never end by themselves).
_STOP_AFTER_DRAIN_SECONDS = 1.0


@dataclass
class ServingServer:
    """A started server with its bound port and health servicer."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    service_names: tuple[str, ...] = ()
    settings: GrpcServerSettings = dataclasses.field(default_factory=GrpcServerSettings)
    gate: DrainGate | None = None  # counts calls in flight; closed by stop()

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Start listening, reporting NOT_SERVING until :meth:`set_serving` says otherwise."""
        # The health servicer starts out SERVING for ""; a probe must not see that before load.
        await self.set_serving(False)
        await self.server.start()

    @contextlib.asynccontextmanager
    async def starting(self) -> AsyncIterator[None]:
        """:meth:`start`, for the start-up in the block (loading, warming up); when the block
        fails, the server stops before the error goes on. Left started, grpc.aio's finaliser
        would shut it down once ``asyncio.run`` had closed the loop: an "Event loop is closed"
        traceback after the reason the process refused to start."""
        await self.start()
        try:
            yield
        except BaseException:
            await self.server.stop(None)
            raise

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def drain(self, grace: float | None = None) -> float:
        """Report NOT_SERVING, refuse new calls with UNAVAILABLE, and wait up to ``grace`` seconds
        (default ``shutdown_grace_seconds``) for the calls in flight to finish; the grace left."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        started = time.monotonic()
        await self.health.enter_graceful_shutdown()
        if self.gate is not None:
            self.gate.close()
            if not await self.gate.drained(grace):
                logger.warning("%d calls still in flight after %.0fs; ending them", self.gate.in_flight, grace)
        return max(grace - (time.monotonic() - started), 0.0)

    async def stop(self, grace: float | None = None) -> None:
        """:meth:`drain`, then stop the server; calls still running are cancelled."""
        left = await self.drain(grace)
        # What is left: calls that arrived as the gate closed (refused at once) and health watches.
        await self.server.stop(min(left, _STOP_AFTER_DRAIN_SECONDS))


def create_server(
    settings: GrpcServerSettings,
    component: str,
    add_servicers: Callable[[grpc.aio.Server], Iterable[str]],
    auth: AuthSettings | None = None,
) -> ServingServer:
    """Build a grpc.aio server with the drain gate, the error interceptor, health and reflection.

    ``add_servicers`` registers the component's servicers and returns their full service
    names. The server is bound (``settings.port`` 0 picks a free port) but not started:
    :meth:`ServingServer.start` starts it NOT_SERVING.
    """
    gate = DrainGate(component)
    interceptors: list[grpc.aio.ServerInterceptor] = [gate]
    tokens = auth.load() if auth is not None else ()
    if tokens:
        interceptors.append(TokenAuthInterceptor(tokens))
    interceptors.append(ErrorMappingInterceptor(component))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=channel_options(settings.max_message_bytes, settings.max_receive_message_bytes),
    )
    service_names = tuple(add_servicers(server))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls.enabled:
            port = server.add_secure_port(address, server_credentials(settings.tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind"
        port = 0
    if port == 0:
        raise errors.StartupError(
            f"{component}: cannot listen on {address} (grpc.port): the port is taken or not allowed; "
            "choose another, or 0 for a free one"
        )
    return ServingServer(
        server=server, port=port, health=health, service_names=service_names, settings=settings, gate=gate
    )


async def serve_until_signalled(serving: ServingServer, on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully and end the process with status 0:
    NOT_SERVING, new calls refused with UNAVAILABLE, the calls in flight drained for up to
    ``shutdown_grace_seconds``, then ``on_stop``.

    The process exits without grpc's own server shutdown: that answers a call arriving in the
    instant it runs with CANCELLED, a status clients do not retry, where a closed connection
    tells them UNAVAILABLE. Only the main function of a server process calls this.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info(
        "shutting down: refusing new calls, draining those in flight for up to %.0fs",
        serving.settings.shutdown_grace_seconds,
    )
    await serving.drain()
    if on_stop is not None:
        await on_stop()
    logger.info("stopped")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
