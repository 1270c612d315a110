"""Where the workers are (the vision workers, the LLM workers): a fixed list, a DNS name, or the
Kubernetes API.

A :class:`Discovery` pushes the whole, sorted list of worker addresses (``host:port``) to
its callback whenever that list changes, typically :meth:`orchestrator.routing.WorkerPool.update`
or :meth:`orchestrator.llm_workers.EndpointPicker.update`.
``start`` makes the first attempt before it returns, so the pool is filled before the
orchestrator serves when the source answers; after that a background thread keeps it fresh.
The callback runs on that thread.

In Kubernetes the orchestrator lists and watches the EndpointSlices of the workers'
(headless) Service (RBAC: ``list`` and ``watch`` on ``endpointslices.discovery.k8s.io``), so a new pod
gets traffic as soon as it is ready and a terminating one stops getting it at once, with
no DNS caching in between.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import kubernetes.client
import kubernetes.config
import kubernetes.watch
from kubernetes.client.exceptions import ApiException

from squint.config import SettingsError

logger = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# A watch is closed by the API server after this long and reopened from the last
# resourceVersion; the client read timeout sits a little above it to catch dead connections.
_WATCH_SECONDS = 300
_CONNECT_TIMEOUT_SECONDS = 10.0
_LIST_READ_TIMEOUT_SECONDS = 60.0
_FIRST_RETRY_SECONDS = 0.5
_QUICK_END_SECONDS = 1.0
_STOP_SECONDS = 5.0


@dataclass(frozen=True)
class DiscoverySettings:
    """How the orchestrator finds a set of workers (the vision workers; the LLM workers)."""

    mode: Literal["static", "dns", "kubernetes"] = field(
        default="static",
        metadata={"help": "where the worker list comes from: static, dns or kubernetes"},
    )
    static_workers: tuple[str, ...] = field(
        default=("127.0.0.1:50061",), metadata={"help": "mode static: the worker addresses, host:port"}
    )
    dns_name: str = field(
        default="",
        metadata={"help": "mode dns: host:port whose A/AAAA records are the workers (a headless Service)"},
    )
    kubernetes_namespace: str = field(
        default="default", metadata={"help": "mode kubernetes: the namespace of the workers' Service"}
    )
    kubernetes_service: str = field(
        default="",
        metadata={"help": "mode kubernetes: the workers' (headless) Service; its EndpointSlices are watched"},
    )
    kubernetes_port_name: str = field(
        default="grpc",
        metadata={"help": "mode kubernetes: the Service port to use (a slice with one port uses that one)"},
    )
    refresh_seconds: float = field(
        default=10.0,
        metadata={
            "help": "mode dns: seconds between resolutions; mode kubernetes: longest pause before retrying the API"
        },
    )


class DiscoveryError(RuntimeError):
    """Discovery cannot start: its configuration is missing or wrong."""


OnChange = Callable[[list[str]], None]


class Discovery(abc.ABC):
    """A source of worker addresses.

    Subclasses fetch addresses and hand them to :meth:`_publish`, which calls the callback
    only when the set changed. ``role`` names the workers in logs and messages ("vision
    worker", "LLM worker"); ``setting`` is the settings group it was built from
    (``discovery``, ``llm_discovery``), named in errors.
    """

    kind: str = "?"

    def __init__(self, role: str = "vision worker", setting: str = "discovery") -> None:
        self._on_change: OnChange | None = None
        self._current: list[str] | None = None
        self.role = role
        self.setting = setting

    @abc.abstractmethod
    def start(self, on_change: OnChange) -> None:
        """Make the first attempt, then keep ``on_change`` informed until :meth:`stop`."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop watching; returns promptly (a few seconds at most) and is safe to call twice."""

    @property
    def workers(self) -> list[str]:
        """The list last published (empty before the first)."""
        return list(self._current or ())

    def _publish(self, addresses: Iterable[str]) -> None:
        current = sorted(set(addresses))
        if current == self._current or self._on_change is None:
            return
        self._current = current
        logger.info("%s discovery: %d %s(s): %s", self.kind, len(current), self.role, ", ".join(current) or "none")
        try:
            self._on_change(list(current))
        except Exception:
            # a broken callback must not end discovery; the next change tries again
            logger.exception("%s discovery: the %s list callback failed", self.kind, self.role)


def _split_host_port(value: str, setting: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{setting}={value!r}: expected host:port, e.g. vision-worker:50061 or [::1]:8001")
    return host, int(port)


def _join_host_port(host: str, port: int) -> str:
    # IPv6 literals need brackets in a gRPC target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StaticDiscovery(Discovery):
    """A fixed list of workers, published once."""

    kind = "static"

    def __init__(self, workers: Sequence[str], role: str = "vision worker", setting: str = "discovery") -> None:
        super().__init__(role, setting)
        if not workers:
            raise SettingsError(f"{setting}.static_workers is empty: list the {role}s as host:port,host:port")
        for worker in workers:
            _split_host_port(worker, f"{setting}.static_workers")
        self._workers = list(workers)

    def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        self._publish(self._workers)

    def stop(self) -> None:
        pass


class DnsDiscovery(Discovery):
    """Every A/AAAA record of a name (a headless Service), resolved again every ``refresh_seconds``.

    A failed resolution keeps the last list: a DNS hiccup must not empty the pool.
    """

    kind = "dns"

    def __init__(
        self, name: str, refresh_seconds: float = 10.0, role: str = "vision worker", setting: str = "discovery"
    ) -> None:
        super().__init__(role, setting)
        self._host, self._port = _split_host_port(name, f"{setting}.dns_name")
        self._refresh_seconds = refresh_seconds
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self, on_change: OnChange) -> None:
        if self._thread is not None:
            raise RuntimeError("DnsDiscovery.start() called twice")
        self._on_change = on_change
        self._resolve()
        self._thread = threading.Thread(target=self._run, name="squint-discovery-dns", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            # a getaddrinfo stuck on a dead resolver cannot be interrupted; the thread is a daemon
            self._thread.join(_STOP_SECONDS)

    def _run(self) -> None:
        while not self._stopping.wait(self._refresh_seconds):
            self._resolve()

    def _resolve(self) -> None:
        try:
            infos = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        except OSError as exc:
            if not self._failing:
                logger.warning(
                    "dns discovery: cannot resolve %s (%s); keeping the %d %s(s) known, retrying every %g s",
                    self._host,
                    exc,
                    len(self.workers),
                    self.role,
                    self._refresh_seconds,
                )
            self._failing = True
            return
        self._failing = False
        self._publish(_join_host_port(str(info[4][0]), self._port) for info in infos)


class KubernetesDiscovery(Discovery):
    """The ready endpoints of a Service's EndpointSlices, listed then watched.

    Keeps each slice's addresses by slice name and publishes their union after every event.
    A watch that the server ends is reopened from the last resourceVersion; one that expired
    (410 Gone, as an ERROR event or as the answer) or failed is replaced by a new list. That
    happens at once after a watch that ran a while, else (a failed list, a watch that ended as
    soon as it opened) after a pause that doubles from 0.5 s up to ``retry_seconds``.

    ``api_client`` is for tests and callers with their own configuration; without one,
    :meth:`start` uses the pod's service account, else the kubeconfig (``KUBECONFIG`` or
    ``~/.kube/config``).
    """

    kind = "kubernetes"

    def __init__(
        self,
        service: str,
        namespace: str = "default",
        port_name: str = "grpc",
        retry_seconds: float = 10.0,
        api_client: kubernetes.client.ApiClient | None = None,
        role: str = "vision worker",
        setting: str = "discovery",
    ) -> None:
        super().__init__(role, setting)
        if not service:
            raise SettingsError(
                f"{setting}.kubernetes_service is empty: name the {role}s' Service, whose EndpointSlices "
                "discovery watches"
            )
        self._service = service
        self._namespace = namespace
        self._port_name = port_name
        self._retry_seconds = retry_seconds
        self._selector = f"{SERVICE_NAME_LABEL}={service}"
        self._api_client = api_client
        self._owns_client = api_client is None
        self._slices: dict[str, list[str]] = {}
        self._watch = kubernetes.watch.Watch()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_change: OnChange) -> None:
        if self._thread is not None:
            raise RuntimeError("KubernetesDiscovery.start() called twice")
        self._on_change = on_change
        if self._api_client is None:
            self._api_client = _load_api_client()
        self._api = kubernetes.client.DiscoveryV1Api(self._api_client)
        try:
            resource_version: str | None = self._list()
        except Exception as exc:  # noqa: BLE001 - a failed first list is retried by the watch loop
            self._log_failure(exc)
            resource_version = None
        self._thread = threading.Thread(
            target=self._run, args=(resource_version,), name="squint-discovery-kubernetes", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        thread = self._thread
        deadline = time.monotonic() + _STOP_SECONDS
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            # Watch.stop() shuts the open stream's socket; repeated because a watch request
            # opened just after a call finds no stream yet
            self._watch.stop()
            thread.join(0.05)
        if thread is not None and thread.is_alive():
            logger.warning("kubernetes discovery: the watch thread did not end within %.0f s", _STOP_SECONDS)
        if self._owns_client and self._api_client is not None:
            self._api_client.close()

    def _run(self, resource_version: str | None) -> None:
        pause = _FIRST_RETRY_SECONDS
        while not self._stopping.is_set():
            watch_began: float | None = None
            try:
                if resource_version is None:
                    resource_version = self._list()
                watch_began = time.monotonic()
                resource_version = self._watch_from(resource_version)
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                resource_version = None
                if exc.status == 410:
                    # our resourceVersion is older than the server keeps: only a new list can catch up
                    logger.info("kubernetes discovery: watch expired (410 Gone); listing EndpointSlices again")
                else:
                    self._log_failure(exc)
            except Exception as exc:  # noqa: BLE001 - connection reset, API server restart, read timeout
                if self._stopping.is_set():
                    break
                resource_version = None
                self._log_failure(exc)
            if watch_began is not None and time.monotonic() - watch_began >= _QUICK_END_SECONDS:
                # the watch ran a while: whatever ended it, carry on at once
                pause = _FIRST_RETRY_SECONDS
                continue
            # a failed list, or a watch that ended as soon as it opened, must not spin on the API
            self._stopping.wait(pause)
            pause = min(pause * 2, self._retry_seconds)

    def _list(self) -> str:
        result = self._api.list_namespaced_endpoint_slice(
            self._namespace,
            label_selector=self._selector,
            _request_timeout=(_CONNECT_TIMEOUT_SECONDS, _LIST_READ_TIMEOUT_SECONDS),
        )
        self._slices = {item.metadata.name: self._ready_addresses(item) for item in result.items}
        self._publish(address for addresses in self._slices.values() for address in addresses)
        return result.metadata.resource_version

    def _watch_from(self, resource_version: str) -> str:
        """Apply watch events until the server ends the stream; returns the last resourceVersion."""
        events = self._watch.stream(
            self._api.list_namespaced_endpoint_slice,
            self._namespace,
            label_selector=self._selector,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            # timeout_seconds also stops Watch from retrying a 410 on its own, so we re-list
            timeout_seconds=_WATCH_SECONDS,
            _request_timeout=(_CONNECT_TIMEOUT_SECONDS, _WATCH_SECONDS + 30),
        )
        for event in events:
            if self._stopping.is_set():
                break
            kind = event["type"]
            if kind in ("ADDED", "MODIFIED"):
                endpoint_slice = event["object"]
                self._slices[endpoint_slice.metadata.name] = self._ready_addresses(endpoint_slice)
            elif kind == "DELETED":
                self._slices.pop(event["object"].metadata.name, None)
            else:  # BOOKMARK: Watch has already taken its resourceVersion
                continue
            self._publish(address for addresses in self._slices.values() for address in addresses)
        return self._watch.resource_version or resource_version

    def _ready_addresses(self, endpoint_slice: kubernetes.client.V1EndpointSlice) -> list[str]:
        name = endpoint_slice.metadata.name
        ports = endpoint_slice.ports or []
        named = [p for p in ports if p.name == self._port_name]
        port = named[0].port if named else ports[0].port if len(ports) == 1 else None
        if port is None:
            logger.warning(
                "kubernetes discovery: EndpointSlice %s has no port named %r (ports: %s); "
                "set %s.kubernetes_port_name to the %ss' Service's gRPC port name",
                name,
                self._port_name,
                ", ".join(f"{p.name or '<unnamed>'}={p.port}" for p in ports) or "none",
                self.setting,
                self.role,
            )
            return []
        addresses = []
        for endpoint in endpoint_slice.endpoints or []:
            # ready unset means ready (the API's own rule)
            if endpoint.conditions is not None and endpoint.conditions.ready is False:
                continue
            # the controller writes one address per endpoint; others carry no meaning
            if endpoint.addresses:
                addresses.append(_join_host_port(endpoint.addresses[0], port))
        return addresses

    def _log_failure(self, exc: Exception) -> None:
        if isinstance(exc, ApiException) and exc.status in (401, 403):
            logger.error(
                "kubernetes discovery: the API refused to list EndpointSlices in namespace %s (%s %s); "
                "grant list and watch on endpointslices.discovery.k8s.io to the orchestrator's service account",
                self._namespace,
                exc.status,
                exc.reason,
            )
        else:
            logger.warning(
                "kubernetes discovery: EndpointSlices of Service %s/%s unavailable (%s); keeping the %d %s(s) known",
                self._namespace,
                self._service,
                exc,
                len(self.workers),
                self.role,
            )


def _load_api_client() -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException as in_cluster:
        try:
            # the library reads KUBECONFIG once, at import; read it when discovery starts
            config_file = os.environ.get("KUBECONFIG", "~/.kube/config")
            kubernetes.config.load_kube_config(
                config_file=config_file, client_configuration=configuration, persist_config=False
            )
        except kubernetes.config.ConfigException as kubeconfig:
            raise DiscoveryError(
                f"kubernetes discovery: no in-cluster service account ({in_cluster}) and no usable kubeconfig "
                f"({kubeconfig}); run in a pod, set KUBECONFIG, or use discovery mode static or dns"
            ) from None
    return kubernetes.client.ApiClient(configuration)


def _static(settings: DiscoverySettings, role: str, setting: str) -> Discovery:
    return StaticDiscovery(settings.static_workers, role, setting)


def _dns(settings: DiscoverySettings, role: str, setting: str) -> Discovery:
    if not settings.dns_name:
        raise SettingsError(
            f"{setting} mode dns needs {setting}.dns_name (host:port), e.g. vision-headless:50061 or llm-headless:8001"
        )
    return DnsDiscovery(settings.dns_name, settings.refresh_seconds, role, setting)


def _kubernetes(settings: DiscoverySettings, role: str, setting: str) -> Discovery:
    return KubernetesDiscovery(
        settings.kubernetes_service,
        namespace=settings.kubernetes_namespace,
        port_name=settings.kubernetes_port_name,
        retry_seconds=settings.refresh_seconds,
        role=role,
        setting=setting,
    )


_MODES: dict[str, Callable[[DiscoverySettings, str, str], Discovery]] = {
    "static": _static,
    "dns": _dns,
    "kubernetes": _kubernetes,
}


def create_discovery(settings: DiscoverySettings, role: str = "vision worker", setting: str = "discovery") -> Discovery:
    """The discovery that ``settings.mode`` names, not yet started: of the ``role`` workers, from the
    settings group ``setting`` (both only name things in logs and errors)."""
    if settings.refresh_seconds <= 0:
        raise SettingsError(f"{setting}.refresh_seconds={settings.refresh_seconds}: must be above 0")
    try:
        build = _MODES[settings.mode]
    except KeyError:
        raise SettingsError(f"{setting}.mode={settings.mode!r}: expected one of {', '.join(_MODES)}") from None
    return build(settings, role, setting)
