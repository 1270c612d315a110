"""Worker discovery: a static list, DNS, and EndpointSlices through the real kubernetes client.

No cluster runs here, so the Kubernetes tests serve the API's JSON from a small HTTP server
of our own: list and watch of EndpointSlices (chunked, newline-delimited watch events, as the
API server streams them), label selectors, resourceVersions, compaction (410 Gone) and bearer
tokens. The discovery under test talks to it through ``kubernetes.client`` and
``kubernetes.watch`` unchanged.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import kubernetes.client
import pytest

from orchestrator.discovery import (
    DiscoveryError,
    DiscoverySettings,
    DnsDiscovery,
    KubernetesDiscovery,
    StaticDiscovery,
    create_discovery,
)
from orchestrator.routing import WorkerPool
from squint.config import SettingsError, env_table, load_settings

NAMESPACE = "squint"
SERVICE = "vision"
SELECTOR = f"kubernetes.io/service-name={SERVICE}"
PATH = re.compile(r"/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices")


def endpoint_slice(name, endpoints, ports=(("grpc", 50061),), service=SERVICE, address_type="IPv4"):
    """An EndpointSlice as the API serves it; ``endpoints`` is (ip, ready), ready None: unset."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "endpoints": [
            {"addresses": [ip], "conditions": {} if ready is None else {"ready": ready, "serving": ready}}
            for ip, ready in endpoints
        ],
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"} for port_name, port in ports],
    }


def status(code, reason, message):
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKubernetesApi(ThreadingHTTPServer):
    """List and watch of EndpointSlices, the way the API server does them.

    Every change gets the next resourceVersion and goes into an event log; a watch from
    resourceVersion R streams the logged events after R and then waits for more. After
    :meth:`compact`, a watch from before the compaction gets 410 Gone, as from etcd.
    """

    daemon_threads = True

    def __init__(self, token: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _ApiHandler)
        self.token = token
        self.revision = 100
        self.compacted = 0
        self.slices: dict[str, dict] = {}
        self.log: list[tuple[int, dict]] = []
        self.requests: list[dict] = []  # what each request asked for, to check selectors and versions
        self.fail_lists: list[int] = []  # status codes for the next list requests
        self.watch_generation = 0  # bumped to end every open watch
        self.error_event: dict | None = None  # sent to the open watches before they end
        self.closing = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.client.ApiClient(kubernetes.client.Configuration(host=self.url))

    def apply(self, kind: str, obj: dict, quietly: bool = False) -> None:
        """ADDED, MODIFIED or DELETED: change the state and, unless ``quietly``, log the event."""
        with self.changed:
            self.revision += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.revision)
            if kind == "DELETED":
                self.slices.pop(obj["metadata"]["name"])
            else:
                self.slices[obj["metadata"]["name"]] = obj
            if not quietly:
                self.log.append((self.revision, {"type": kind, "object": obj}))
            self.changed.notify_all()

    def bookmark(self) -> None:
        with self.changed:
            self.revision += 1
            bookmark = {
                "kind": "EndpointSlice",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.revision)},
            }
            self.log.append((self.revision, {"type": "BOOKMARK", "object": bookmark}))
            self.changed.notify_all()

    def compact(self, error_event: bool) -> None:
        """Forget the event log and end the open watches: with an ERROR 410 event, or cleanly."""
        with self.changed:
            self.compacted = self.revision
            self.log.clear()
            self.error_event = status(410, "Expired", "too old resource version") if error_event else None
            self.watch_generation += 1
            self.changed.notify_all()

    def requests_of(self, kind: str) -> list[dict]:
        with self.changed:
            return [r for r in self.requests if r["kind"] == kind]

    def close(self) -> None:
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        self.shutdown()
        self.server_close()


class _ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the watch body is chunked, as the API server sends it
    server: FakeKubernetesApi

    def log_message(self, format, *args):  # `format`: the base class names it so
        pass

    def do_GET(self) -> None:
        api = self.server
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        match = PATH.fullmatch(url.path)
        watch = query.get("watch") in ("true", "1")
        with api.changed:
            api.requests.append({"kind": "watch" if watch else "list", "path": url.path, **query})
        if api.token and self.headers.get("Authorization") != f"Bearer {api.token}":
            return self._json(401, status(401, "Unauthorized", "Unauthorized"))
        if not match:
            return self._json(404, status(404, "NotFound", f"the server could not find {url.path}"))
        # the one selector discovery may send: kubernetes.io/service-name=<service>
        key, _, value = query.get("labelSelector", "").partition("=")
        if key != "kubernetes.io/service-name" or not value:
            message = f"unexpected labelSelector {query.get('labelSelector')!r}"
            return self._json(400, status(400, "BadRequest", message))
        if not watch:
            return self._list(match[1], value)
        return self._watch(match[1], value, int(query.get("resourceVersion") or 0))

    def _selected(self, namespace: str, service: str, obj: dict) -> bool:
        metadata = obj["metadata"]
        labels = metadata.get("labels", {})
        return metadata.get("namespace") == namespace and labels.get("kubernetes.io/service-name") == service

    def _list(self, namespace: str, service: str) -> None:
        api = self.server
        with api.changed:
            if api.fail_lists:
                code = api.fail_lists.pop(0)
                return self._json(code, status(code, "Forbidden", "endpointslices is forbidden"))
            items = [copy.deepcopy(s) for s in api.slices.values() if self._selected(namespace, service, s)]
            revision = api.revision
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": str(revision)},
            "items": items,
        }
        self._json(200, body)

    def _watch(self, namespace: str, service: str, since: int) -> None:
        api = self.server
        with api.changed:
            if since < api.compacted:
                return self._json(410, status(410, "Expired", f"too old resource version: {since} ({api.compacted})"))
            generation = api.watch_generation
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        cursor = since
        while True:
            with api.changed:
                api.changed.wait_for(
                    lambda: (
                        api.closing or api.watch_generation != generation or any(rev > cursor for rev, _ in api.log)
                    ),
                    timeout=0.1,
                )
                if api.closing:
                    return self._end_chunks()
                if api.watch_generation != generation:
                    if api.error_event is not None:
                        self._chunk({"type": "ERROR", "object": api.error_event})
                    return self._end_chunks()
                events = [(rev, event) for rev, event in api.log if rev > cursor]
            for rev, event in events:
                cursor = rev
                if event["type"] != "BOOKMARK" and not self._selected(namespace, service, event["object"]):
                    continue
                if not self._chunk(event):
                    return

    def _chunk(self, event: dict) -> bool:
        data = json.dumps(event).encode() + b"\n"
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError:  # the client went away (discovery stopped)
            return False
        return True

    def _end_chunks(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Published:
    """The on_change callback: every list it was given, and a way to wait for one."""

    def __init__(self) -> None:
        self.lists: list[list[str]] = []
        self._changed = threading.Condition()

    def __call__(self, workers: list[str]) -> None:
        with self._changed:
            self.lists.append(workers)
            self._changed.notify_all()

    @property
    def last(self) -> list[str] | None:
        with self._changed:
            return self.lists[-1] if self.lists else None

    def wait_for(self, expected: list[str], timeout: float = 5.0) -> None:
        with self._changed:
            reached = self._changed.wait_for(lambda: self.lists and self.lists[-1] == expected, timeout)
            assert reached, f"waited for {expected}, got {self.lists}"


@pytest.fixture
def api():
    server = FakeKubernetesApi()
    server.thread.start()
    yield server
    server.close()


@pytest.fixture
def slices(api):
    """Two slices of the vision Service and one of another Service."""
    api.apply("ADDED", endpoint_slice("vision-a", [("10.0.0.1", True)]))
    api.apply("ADDED", endpoint_slice("vision-b", [("10.0.0.2", None)], ports=(("metrics", 9090), ("grpc", 50061))))
    api.apply("ADDED", endpoint_slice("llm-a", [("10.0.9.9", True)], service="llm"))
    return api


@pytest.fixture
def started(slices):
    """A discovery started on those slices, and what it published."""
    api = slices
    published = Published()
    discovery = KubernetesDiscovery(SERVICE, namespace=NAMESPACE, retry_seconds=0.5, api_client=api.api_client())
    discovery.start(published)
    yield discovery, published
    discovery.stop()


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# static and DNS


def test_static_discovery_publishes_its_list_once():
    published = Published()
    discovery = StaticDiscovery(["10.0.0.2:50061", "10.0.0.1:50061", "10.0.0.1:50061"])
    discovery.start(published)
    discovery.stop()
    assert published.lists == [["10.0.0.1:50061", "10.0.0.2:50061"]]


@pytest.mark.parametrize("workers", [(), ("vision-worker",), ("vision-worker:http",), ("host:70000",)])
def test_static_discovery_rejects_what_is_not_host_port(workers):
    with pytest.raises(SettingsError, match="static_workers"):
        StaticDiscovery(workers)


def test_dns_discovery_resolves_localhost_and_publishes_only_changes():
    published = Published()
    discovery = DnsDiscovery("localhost:50061", refresh_seconds=0.02)
    discovery.start(published)
    try:
        # the first resolution happens before start() returns
        assert published.lists and "127.0.0.1:50061" in published.lists[0]
        assert set(published.lists[0]) <= {"127.0.0.1:50061", "[::1]:50061"}
        time.sleep(0.2)  # about ten resolutions, all the same
        assert len(published.lists) == 1
    finally:
        started_stop = time.monotonic()
        discovery.stop()
    assert time.monotonic() - started_stop < 1.0


def test_dns_discovery_survives_a_name_that_does_not_resolve(caplog):
    published = Published()
    discovery = DnsDiscovery("no-such-host.invalid:50061", refresh_seconds=0.05)
    discovery.start(published)
    discovery.stop()
    assert published.lists == []
    assert "cannot resolve no-such-host.invalid" in caplog.text


# Kubernetes EndpointSlices


def test_initial_list_gives_the_ready_workers_of_the_service(api, started):
    discovery, published = started
    # vision-b's grpc port is its second; llm-a belongs to another Service
    assert published.lists == [["10.0.0.1:50061", "10.0.0.2:50061"]]
    assert discovery.workers == ["10.0.0.1:50061", "10.0.0.2:50061"]
    wait_until(lambda: api.requests_of("watch"))
    (listed,) = api.requests_of("list")
    watch = api.requests_of("watch")[0]
    assert listed["path"] == watch["path"] == f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"
    assert listed["labelSelector"] == watch["labelSelector"] == SELECTOR
    assert watch["resourceVersion"] == "103"  # the list's, so no event in between is lost
    assert watch["allowWatchBookmarks"] == "true"


def test_watch_events_add_drop_and_delete_workers(api, started):
    _, published = started
    # a third pod joins slice a while the first stops being ready
    api.apply("MODIFIED", endpoint_slice("vision-a", [("10.0.0.1", False), ("10.0.0.3", True)]))
    published.wait_for(["10.0.0.2:50061", "10.0.0.3:50061"])
    api.bookmark()
    api.apply("DELETED", endpoint_slice("vision-b", [("10.0.0.2", True)]))
    published.wait_for(["10.0.0.3:50061"])
    api.apply("ADDED", endpoint_slice("vision-c", [("fd00::7", True)], address_type="IPv6"))
    published.wait_for(["10.0.0.3:50061", "[fd00::7]:50061"])
    # another Service's changes are not ours (the server filters by label)
    api.apply("MODIFIED", endpoint_slice("llm-a", [("10.0.9.8", True)], service="llm"))
    api.apply("ADDED", endpoint_slice("vision-d", [("10.0.0.4", True)], ports=(("", 6000),)))
    published.wait_for(["10.0.0.3:50061", "10.0.0.4:6000", "[fd00::7]:50061"])
    assert len(api.requests_of("list")) == 1  # all of that through one list and the watch


def test_a_slice_without_the_named_port_is_skipped_with_a_warning(api, started, caplog):
    _, published = started
    api.apply("ADDED", endpoint_slice("vision-e", [("10.0.0.5", True)], ports=(("metrics", 9090), ("http", 8080))))
    api.apply("ADDED", endpoint_slice("vision-f", [("10.0.0.6", True)]))
    published.wait_for(["10.0.0.1:50061", "10.0.0.2:50061", "10.0.0.6:50061"])
    assert "EndpointSlice vision-e has no port named 'grpc' (ports: metrics=9090, http=8080)" in caplog.text


def test_an_error_410_event_makes_it_list_again(api, started):
    _, published = started
    wait_until(lambda: api.requests_of("watch"))
    # changes the watch never reports: only a fresh list can show them
    api.apply("DELETED", endpoint_slice("vision-a", []), quietly=True)
    api.apply("ADDED", endpoint_slice("vision-g", [("10.0.0.7", True)]), quietly=True)
    api.compact(error_event=True)
    published.wait_for(["10.0.0.2:50061", "10.0.0.7:50061"])
    assert len(api.requests_of("list")) == 2
    # and it watches again from the new list's version
    wait_until(lambda: len(api.requests_of("watch")) == 2)
    assert api.requests_of("watch")[1]["resourceVersion"] == str(api.revision)
    api.apply("MODIFIED", endpoint_slice("vision-g", [("10.0.0.7", True), ("10.0.0.8", True)]))
    published.wait_for(["10.0.0.2:50061", "10.0.0.7:50061", "10.0.0.8:50061"])


def test_an_ended_watch_resumes_and_a_410_answer_makes_it_list_again(api, started):
    _, published = started
    api.apply("MODIFIED", endpoint_slice("vision-a", [("10.0.0.1", True), ("10.0.0.3", True)]))
    published.wait_for(["10.0.0.1:50061", "10.0.0.2:50061", "10.0.0.3:50061"])
    watched_from = api.revision
    # the server ends the stream: discovery watches again from the last version it saw
    with api.changed:
        api.watch_generation += 1
        api.changed.notify_all()
    wait_until(lambda: len(api.requests_of("watch")) == 2)
    assert api.requests_of("watch")[1]["resourceVersion"] == str(watched_from)
    assert len(api.requests_of("list")) == 1
    # now that version is compacted away: the watch request itself is answered 410 Gone
    api.apply("DELETED", endpoint_slice("vision-b", []), quietly=True)
    api.compact(error_event=False)
    published.wait_for(["10.0.0.1:50061", "10.0.0.3:50061"])
    assert len(api.requests_of("list")) == 2
    assert api.requests_of("watch")[2]["resourceVersion"] == str(watched_from)


def test_an_api_failure_is_retried_and_a_refusal_names_the_rbac_fix(api, caplog):
    api.apply("ADDED", endpoint_slice("vision-a", [("10.0.0.1", True)]))
    api.fail_lists = [403, 403]
    published = Published()
    discovery = KubernetesDiscovery(SERVICE, namespace=NAMESPACE, retry_seconds=0.2, api_client=api.api_client())
    discovery.start(published)
    try:
        assert published.lists == []  # start() did not raise: the pod may get its RBAC later
        published.wait_for(["10.0.0.1:50061"])
        assert len(api.requests_of("list")) == 3
        assert "grant list and watch on endpointslices.discovery.k8s.io" in caplog.text
    finally:
        discovery.stop()


def test_stop_returns_promptly_while_the_watch_is_open(api, started):
    discovery, _ = started
    wait_until(lambda: api.requests_of("watch"))
    time.sleep(0.1)  # the stream is open and idle
    began = time.monotonic()
    discovery.stop()
    assert time.monotonic() - began < 2.0
    assert not any(t.name == "squint-discovery-kubernetes" and t.is_alive() for t in threading.enumerate())


def test_stop_right_after_start_returns_promptly(api):
    api.apply("ADDED", endpoint_slice("vision-a", [("10.0.0.1", True)]))
    discovery = KubernetesDiscovery(SERVICE, namespace=NAMESPACE, api_client=api.api_client())
    discovery.start(Published())
    began = time.monotonic()
    discovery.stop()
    assert time.monotonic() - began < 2.0


def test_discovery_feeds_the_worker_pool(api, slices):
    # the wiring the orchestrator uses: discovery.start(pool.update)
    api.apply("ADDED", endpoint_slice("vision-a", [("10.0.0.1", True), ("10.0.0.3", True)]))
    pool = WorkerPool()
    discovery = KubernetesDiscovery(SERVICE, namespace=NAMESPACE, api_client=api.api_client())
    discovery.start(pool.update)
    try:
        assert pool.workers == {"10.0.0.1:50061", "10.0.0.2:50061", "10.0.0.3:50061"}
        api.apply("DELETED", endpoint_slice("vision-b", []))
        wait_until(lambda: pool.workers == {"10.0.0.1:50061", "10.0.0.3:50061"})
    finally:
        discovery.stop()


def test_kubeconfig_is_used_outside_a_pod(tmp_path, monkeypatch):
    api = FakeKubernetesApi(token="s3cret")
    api.thread.start()
    try:
        api.apply("ADDED", endpoint_slice("vision-a", [("10.0.0.1", True)]))
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                    "users": [{"name": "orchestrator", "user": {"token": "s3cret"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "orchestrator"}}],
                    "current-context": "fake",
                }
            )
        )
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        published = Published()
        discovery = create_discovery(
            DiscoverySettings(mode="kubernetes", kubernetes_namespace=NAMESPACE, kubernetes_service=SERVICE)
        )
        discovery.start(published)
        discovery.stop()
        assert published.lists == [["10.0.0.1:50061"]]
    finally:
        api.close()


def test_no_cluster_configuration_fails_start_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    discovery = KubernetesDiscovery(SERVICE)
    with pytest.raises(DiscoveryError, match="no in-cluster service account .* set KUBECONFIG"):
        discovery.start(Published())


# settings


def test_settings_load_from_the_environment_and_document_every_field():
    env = {
        "SQUINT_TEST_MODE": "kubernetes",
        "SQUINT_TEST_KUBERNETES_SERVICE": "vision",
        "SQUINT_TEST_STATIC_WORKERS": "a:1, b:2",
        "SQUINT_TEST_REFRESH_SECONDS": "2.5",
    }
    settings = load_settings(DiscoverySettings, "SQUINT_TEST_", env)
    assert settings.mode == "kubernetes"
    assert settings.kubernetes_service == "vision"
    assert settings.static_workers == ("a:1", "b:2")
    assert settings.refresh_seconds == 2.5
    with pytest.raises(SettingsError, match="SQUINT_TEST_MODE"):
        load_settings(DiscoverySettings, "SQUINT_TEST_", {"SQUINT_TEST_MODE": "consul"})
    assert all(row.help for row in env_table(DiscoverySettings, "SQUINT_TEST_"))


def test_create_discovery_builds_the_mode_it_names():
    assert isinstance(create_discovery(DiscoverySettings()), StaticDiscovery)
    assert isinstance(create_discovery(DiscoverySettings(mode="dns", dns_name="vision:50061")), DnsDiscovery)
    kubernetes_settings = DiscoverySettings(mode="kubernetes", kubernetes_service="vision")
    assert isinstance(create_discovery(kubernetes_settings), KubernetesDiscovery)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (DiscoverySettings(mode="dns"), "needs discovery.dns_name"),
        (DiscoverySettings(mode="dns", dns_name="vision"), "dns_name='vision': expected host:port"),
        (DiscoverySettings(mode="kubernetes"), "kubernetes_service is empty"),
        (DiscoverySettings(refresh_seconds=0), "refresh_seconds=0: must be above 0"),
        (DiscoverySettings(mode="consul"), "expected one of static, dns, kubernetes"),
    ],
)
def test_create_discovery_names_what_is_wrong(settings, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        create_discovery(settings)
