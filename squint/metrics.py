"""Prometheus metrics: one registry per process, served over HTTP beside the gRPC port."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from squint.errors import StartupError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricsSettings:
    """Where a process serves its Prometheus metrics."""

    enabled: bool = field(default=True, metadata={"help": "serve /metrics over HTTP"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 in a pod"})
    port: int = field(default=9464, metadata={"help": "HTTP port of /metrics; 0 picks a free one"})


def serve_metrics(settings: MetricsSettings, registry: CollectorRegistry, port_file: Path | None = None) -> int | None:
    """Start the /metrics HTTP server in a daemon thread; the bound port, or None when disabled."""
    if not settings.enabled:
        return None
    try:
        server, _thread = start_http_server(settings.port, addr=settings.host, registry=registry)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {settings.host}:{settings.port} (metrics.port): {exc.strerror}; "
            "choose another port, or 0 for a free one"
        ) from None
    port = int(server.server_port)
    if port_file is not None:
        port_file.write_text(str(port))
    logger.info("metrics on http://%s:%d/metrics", settings.host, port)
    return port
