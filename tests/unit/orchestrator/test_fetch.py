"""Media URLs fetched safely, against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchestrator.fetch import FetchSettings, MediaFetcher
from squint.errors import InvalidRequest

PICTURE = b"\x89PNG picture bytes"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path
        if path == "/picture.png":
            self._send(200, PICTURE, "image/png")
        elif path == "/page.html":
            self._send(200, b"<html></html>", "text/html")
        elif path == "/big.png":
            self._send(200, b"x" * 5000, "image/png")
        elif path == "/big-undeclared.png":
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        elif path == "/slow.png":
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("location", path.removeprefix("/redirect-to/"))
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("location", "/loop")
            self.end_headers()
        else:
            self._send(404, b"", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetch(url: str, kind: str = "image", **settings) -> bytes:
    fetcher = MediaFetcher(FetchSettings(**{"allowed_networks": ("127.0.0.1/32",), **settings}))
    return asyncio.run(fetcher.fetch(url, kind, "messages[0].content[0].image_url.url"))


def test_a_picture_is_fetched_from_an_allowed_network_and_a_data_url_decoded(server):
    assert fetch(f"{server}/picture.png") == PICTURE
    assert fetch(f"{server}/redirect-to/{server}/picture.png") == PICTURE
    assert fetch("data:image/png;base64,aGVsbG8=") == b"hello"


@pytest.mark.parametrize(
    ("path", "settings", "message"),
    [
        ("/picture.png", {"allowed_networks": ()}, "resolves to 127.0.0.1, a private, loopback"),
        ("/picture.png", {"allowed_domains": ("example.com",)}, "host 127.0.0.1 is not an allowed domain"),
        ("/redirect-to/http://127.0.0.2:9/x.png", {}, "resolves to 127.0.0.2"),
        ("/redirect-to/http://169.254.169.254/latest/meta-data", {}, "resolves to 169.254.169.254"),
        ("/redirect-to/file:///etc/passwd", {}, "a redirect to a non-http(s) URL is refused"),
        ("/loop", {"max_redirects": 2}, "more than 2 redirects (http.fetch.max_redirects)"),
        ("/big.png", {"max_image_bytes": 1000}, "larger than 1000 bytes (http.fetch.max_image_bytes)"),
        ("/big-undeclared.png", {"max_image_bytes": 1000}, "larger than 1000 bytes"),
        ("/slow.png", {"image_timeout_seconds": 0.5}, "longer than 0.5 s (http.fetch.image_timeout_seconds)"),
        ("/page.html", {}, "content type 'text/html' is not one of image/"),
        ("/missing.png", {}, "the server answered HTTP 404"),
    ],
)
def test_refusals_name_the_field_and_the_setting(server, path, settings, message):
    with pytest.raises(InvalidRequest, match="^messages\\[0\\].content\\[0\\].image_url.url: ") as caught:
        fetch(f"{server}{path}", **settings)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "the file URL scheme is refused"),
        ("ftp://example.com/x.png", "the ftp URL scheme is refused"),
        ("gopher://x", "the gopher URL scheme is refused"),
        ("data:image/png,raw", "a data URL must be base64"),
        ("http://[::1]:9/x.png", "resolves to ::1"),
        ("http://0.0.0.0:9/x.png", "resolves to 0.0.0.0"),
    ],
)
def test_other_schemes_and_internal_hosts_are_refused(url, message):
    with pytest.raises(InvalidRequest, match=message.replace("[", "\\[").replace("(", "\\(")):
        fetch(url, allowed_networks=())
