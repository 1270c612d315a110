"""tritonserver's gRPC TLS flags, from the launcher's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_worker.tritonserver import TritonServerError, TritonServerSettings, tritonserver_command
from squint.rpc import ServerTlsSettings


@pytest.fixture
def pem(tmp_path: Path):
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    return lambda name: str(tmp_path / name)


def command(tls: ServerTlsSettings, tmp_path: Path) -> list[str]:
    return tritonserver_command(TritonServerSettings(grpc_tls=tls), tmp_path, (1, 2, 3))


def test_no_certificate_means_no_tls_flags(tmp_path):
    assert not [a for a in command(ServerTlsSettings(), tmp_path) if "ssl" in a]


def test_a_certificate_turns_on_tls_and_a_client_ca_mutual_tls(pem, tmp_path):
    tls = ServerTlsSettings(cert_file=pem("server.crt"), key_file=pem("server.key"))
    flags = [a for a in command(tls, tmp_path) if "ssl" in a or "grpc-server" in a or "root-cert" in a]
    assert flags == [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={pem('server.crt')}",
        f"--grpc-server-key={pem('server.key')}",
    ]
    mutual = [a for a in command(ServerTlsSettings(pem("server.crt"), pem("server.key"), pem("ca.crt")), tmp_path)]
    assert f"--grpc-root-cert={pem('ca.crt')}" in mutual and "--grpc-use-ssl-mutual=true" in mutual


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        (ServerTlsSettings(cert_file="server.crt"), "grpc_tls.key_file is empty"),
        (
            ServerTlsSettings(cert_file="/nonexistent/server.crt", key_file="k"),
            "grpc_tls.cert_file is /nonexistent/server.crt",
        ),
    ],
)
def test_incomplete_tls_settings_are_named(tls, message, tmp_path):
    with pytest.raises(TritonServerError, match=message):
        command(tls, tmp_path)
