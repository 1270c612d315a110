"""Media by URL, fetched safely: the ``image_url`` and ``video_url`` of the HTTP API.

``data:`` URLs are decoded; ``http(s)`` URLs are fetched by the orchestrator under limits that are
settings, each refusal naming its setting: the allowed domains (empty: any host), no private,
loopback, link-local (cloud metadata), reserved or multicast address unless its network is
allowed (checked on the addresses the name resolves to, before connecting, and again for every
redirect), a redirect limit, a timeout (connect, read and the whole fetch: 5 s for a picture,
30 s for a video by default, as vLLM), a byte limit enforced while reading, and the content
types. Every other scheme (``file:``, ``ftp:``...) is refused.

Known gap: the name is resolved for the check and again by the HTTP client to connect, so a
name whose DNS answer changes in between (DNS rebinding) is not caught.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from squint.errors import InvalidRequest


@dataclass(frozen=True)
class FetchSettings:
    """How the HTTP API fetches ``http(s)`` media URLs."""

    allowed_domains: tuple[str, ...] = field(
        default=(), metadata={"help": "hosts media may be fetched from (a domain allows its subdomains); empty: any"}
    )
    allowed_networks: tuple[str, ...] = field(
        default=(),
        metadata={"help": "CIDRs fetched from although private, loopback or link-local (e.g. 10.0.0.0/8)"},
    )
    max_redirects: int = field(default=3, metadata={"help": "redirects followed per media URL"})
    image_timeout_seconds: float = field(
        default=5.0, metadata={"help": "connect, read and whole-fetch timeout of a picture"}
    )
    video_timeout_seconds: float = field(
        default=30.0, metadata={"help": "connect, read and whole-fetch timeout of a video"}
    )
    max_image_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "largest picture fetched"})
    max_video_bytes: int = field(default=256 * 1024 * 1024, metadata={"help": "largest video fetched"})
    image_content_types: tuple[str, ...] = field(
        default=("image/",), metadata={"help": "content-type prefixes accepted for pictures"}
    )
    video_content_types: tuple[str, ...] = field(
        default=("video/", "application/octet-stream"), metadata={"help": "content-type prefixes accepted for videos"}
    )


SETTING = "http.fetch"  # how refusals name the settings (SQUINT_ORCHESTRATOR_HTTP_FETCH_*)


def decode_data_url(url: str, field_name: str) -> bytes:
    """The bytes of a ``data:[type];base64,...`` URL."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidRequest(f"{field_name}: a data URL must be base64 (data:<type>;base64,<data>)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field_name}: the data URL's base64 does not decode") from None


class MediaFetcher:
    """Fetches media URLs under :class:`FetchSettings`."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._networks = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.allowed_networks]

    async def fetch(self, url: str, kind: str, field_name: str) -> bytes:
        """``kind`` is "image" or "video"; errors are :class:`InvalidRequest` naming ``field_name``."""
        if url.startswith("data:"):
            return decode_data_url(url, field_name)
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidRequest(
                f"{field_name}: the {scheme or 'missing'} URL scheme is refused; send an http(s) or data URL"
            )
        s = self.settings
        timeout = s.image_timeout_seconds if kind == "image" else s.video_timeout_seconds
        try:
            return await asyncio.wait_for(self._follow(url, kind, field_name, timeout), timeout)
        except TimeoutError:
            raise InvalidRequest(
                f"{field_name}: fetching took longer than {timeout:g} s ({SETTING}.{kind}_timeout_seconds)"
            ) from None

    async def _follow(self, url: str, kind: str, field_name: str, timeout: float) -> bytes:
        s = self.settings
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client:
            for _ in range(s.max_redirects + 1):
                await self._check_host(url, field_name)
                try:
                    async with client.stream("GET", url) as reply:
                        if reply.is_redirect:
                            url = urljoin(url, reply.headers.get("location", ""))
                            if urlsplit(url).scheme.lower() not in ("http", "https"):
                                raise InvalidRequest(f"{field_name}: a redirect to a non-http(s) URL is refused")
                            continue
                        return await self._read(reply, kind, field_name)
                except httpx.HTTPError as exc:
                    raise InvalidRequest(f"{field_name}: the fetch failed ({type(exc).__name__})") from None
        raise InvalidRequest(f"{field_name}: more than {s.max_redirects} redirects ({SETTING}.max_redirects)")

    async def _check_host(self, url: str, field_name: str) -> None:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if not host:
            raise InvalidRequest(f"{field_name}: the URL has no host")
        domains = self.settings.allowed_domains
        if domains and not any(host == d or host.endswith("." + d) for d in domains):
            raise InvalidRequest(f"{field_name}: host {host} is not an allowed domain ({SETTING}.allowed_domains)")
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise InvalidRequest(f"{field_name}: host {host} does not resolve") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if _internal(address) and not any(address in network for network in self._networks):
                raise InvalidRequest(
                    f"{field_name}: host {host} resolves to {address}, a private, loopback, link-local or reserved "
                    f"address; fetching it is refused unless its network is allowed ({SETTING}.allowed_networks)"
                )

    async def _read(self, reply: httpx.Response, kind: str, field_name: str) -> bytes:
        s = self.settings
        if reply.status_code != 200:
            raise InvalidRequest(f"{field_name}: the server answered HTTP {reply.status_code}")
        content_type = reply.headers.get("content-type", "").split(";")[0].strip().lower()
        accepted = s.image_content_types if kind == "image" else s.video_content_types
        if not any(content_type.startswith(prefix) for prefix in accepted):
            raise InvalidRequest(
                f"{field_name}: content type {content_type or 'none'!r} is not one of {', '.join(accepted)} "
                f"({SETTING}.{kind}_content_types)"
            )
        limit = s.max_image_bytes if kind == "image" else s.max_video_bytes
        over = f"{field_name}: the {kind} is larger than {limit} bytes ({SETTING}.max_{kind}_bytes)"
        declared = reply.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise InvalidRequest(over)
        data = bytearray()
        async for piece in reply.aiter_bytes():
            data += piece
            if len(data) > limit:
                raise InvalidRequest(over)
        return bytes(data)


def _internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
    )
