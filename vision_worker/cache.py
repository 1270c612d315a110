"""The encoding cache: compressed visual tokens by content key, in Redis or in process.

Values are raw tensor bytes behind a small JSON header (format version, dtype, shape,
checksum, metadata) — never pickle. A value that fails any check is a miss and is deleted.
Redis being down degrades to no cache, never to an error: the worker logs the outage once,
serves without cache, and tries Redis again after ``retry_seconds``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import redis.asyncio as aioredis
import redis.exceptions

logger = logging.getLogger(__name__)

# Bump when the value layout changes: every old entry becomes a miss.
CACHE_FORMAT_VERSION = 1
# Per kind of key, bumped when what a key stands for changes: that kind's old entries become misses
# (features v2: keyed by image, pack, dtype and layer only, without the inputs asked for or a question).
KEY_VERSIONS = {"tokens": 1, "features": 2, "question": 1}
_MAGIC = b"SQT"
_HEADER_LEN = struct.Struct("<I")
_DTYPES = {"float32", "float16"}


@dataclass(frozen=True)
class CacheSettings:
    """Where and how long encodings are cached."""

    redis_url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata={"help": "Redis URL; empty uses an in-process cache instead"},
    )
    ttl_seconds: int = field(default=24 * 3600, metadata={"help": "lifetime of a cached encoding; 0 keeps it"})
    key_prefix: str = field(default="squint", metadata={"help": "prefix of every Redis key"})
    socket_timeout_seconds: float = field(default=0.5, metadata={"help": "Redis connect and read timeout"})
    retry_seconds: float = field(default=5.0, metadata={"help": "wait after a Redis failure before trying again"})
    in_process_max_bytes: int = field(
        default=256 * 1024 * 1024, metadata={"help": "bound of the in-process cache (used without Redis)"}
    )
    enabled: bool = field(default=True, metadata={"help": "false disables caching altogether"})
    redis_password_file: str = field(
        default="", metadata={"help": "a file holding the Redis AUTH password (a mounted Secret); or put it in the URL"}
    )
    redis_ca_file: str = field(default="", metadata={"help": "PEM CA bundle to verify Redis over TLS (rediss:// URLs)"})
    redis_cert_file: str = field(default="", metadata={"help": "PEM client certificate for Redis mutual TLS"})
    redis_key_file: str = field(default="", metadata={"help": "PEM private key of redis_cert_file"})
    features_memory_bytes: int = field(
        default=1 << 30,
        metadata={"help": "bound of the CLIP features this worker keeps, with the tokens Analyze hands to Encode"},
    )
    features_include_hidden_states: bool = field(
        default=False, metadata={"help": "also put every CLIP hidden state in Redis (tens of MB per image for CLIP-L)"}
    )


@dataclass(frozen=True)
class CachedTensors:
    """A cached value: named tensors (compressed tokens, or an image's CLIP features) and the
    metadata needed to answer without recomputing."""

    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]


def _identity_key(kind: str, prefix: str, identity: dict[str, Any]) -> str:
    digest = hashlib.sha256(
        json.dumps({"format": CACHE_FORMAT_VERSION, **identity}, sort_keys=True).encode()
    ).hexdigest()
    return f"{prefix}:{kind}:v{KEY_VERSIONS[kind]}:{digest}"


def tokens_key(
    prefix: str,
    *,
    image_hash: str,
    pack_id: str,
    feature_layer: Any,
    compressor: str,
    params: str,
    dtype: str,
    question_hash: str | None = None,
    budget: int = 0,
) -> str:
    """The key of compressed tokens: a hash of everything that determines them (``budget`` is the
    cap a budget-fitting compressor was held to; 0 when it ran unconstrained)."""
    identity = {
        "image": image_hash,
        "pack": pack_id,
        "layer": feature_layer,
        "compressor": compressor,
        "params": params,
        "dtype": dtype,
        "question": question_hash,
    }
    if budget:
        identity["budget"] = budget
    return _identity_key("tokens", prefix, identity)


def features_key(prefix: str, *, image_hash: str, pack_id: str, dtype: str, feature_layer: Any) -> str:
    """The key of an image's CLIP features, shared by every compressor and question: which inputs a
    value holds is read from the value (``vision_worker.features.holds``)."""
    return _identity_key(
        "features", prefix, {"image": image_hash, "pack": pack_id, "dtype": dtype, "layer": feature_layer}
    )


def question_key(prefix: str, *, pack_id: str, dtype: str, question_hash: str) -> str:
    """The key of a question's CLIP text embedding: any image asked that question shares it."""
    return _identity_key("question", prefix, {"pack": pack_id, "dtype": dtype, "question": question_hash})


def _checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def encode_value(value: CachedTensors) -> bytes:
    """Serialise as: magic, header length, JSON header (per tensor: name, dtype, shape, offset),
    then every tensor's raw little-endian bytes. One checksum covers all of them."""
    entries, chunks, offset = [], [], 0
    for name, tensor in value.tensors.items():
        array = np.ascontiguousarray(tensor)
        if array.dtype.name not in _DTYPES:
            raise TypeError(f"cannot cache dtype {array.dtype.name} ({name})")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        entries.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape), "offset": offset})
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)
    header = json.dumps(
        {"format": CACHE_FORMAT_VERSION, "tensors": entries, "checksum": _checksum(payload), "meta": value.meta},
        sort_keys=True,
    ).encode()
    return _MAGIC + _HEADER_LEN.pack(len(header)) + header + payload


def decode_value(blob: bytes) -> CachedTensors | None:
    """Parse a cached value; ``None`` when it is from another format or fails any check."""
    try:
        if not blob.startswith(_MAGIC):
            return None
        (header_len,) = _HEADER_LEN.unpack_from(blob, len(_MAGIC))
        start = len(_MAGIC) + _HEADER_LEN.size
        header = json.loads(blob[start : start + header_len])
        payload = blob[start + header_len :]
        if header.get("format") != CACHE_FORMAT_VERSION or _checksum(payload) != header.get("checksum"):
            return None
        tensors = {}
        expected = 0
        for entry in header["tensors"]:
            if entry["dtype"] not in _DTYPES:
                return None
            dtype = np.dtype(entry["dtype"]).newbyteorder("<")
            shape = tuple(int(d) for d in entry["shape"])
            size = int(np.prod(shape)) * dtype.itemsize
            if entry["offset"] != expected or expected + size > len(payload):
                return None
            data = payload[expected : expected + size]
            tensors[entry["name"]] = np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
            expected += size
        if expected != len(payload):
            return None
        return CachedTensors(tensors=tensors, meta=dict(header.get("meta") or {}))
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError):
        return None


class TokenCache(Protocol):
    """Where encodings are kept. Implementations never raise on backend failure."""

    description: str

    async def get(self, key: str) -> CachedTensors | None: ...

    async def put(self, key: str, value: CachedTensors) -> None: ...

    async def close(self) -> None: ...


class NullCache:
    """Caching disabled."""

    description = "disabled"

    async def get(self, key: str) -> CachedTensors | None:
        return None

    async def put(self, key: str, value: CachedTensors) -> None:
        return None

    async def close(self) -> None:
        return None


class InProcessCache:
    """A bounded LRU of encoded values in this process (used when no Redis is configured)."""

    def __init__(self, max_bytes: int) -> None:
        self.description = f"in-process (up to {max_bytes // (1024 * 1024)} MiB)"
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> CachedTensors | None:
        blob = self._entries.get(key)
        if blob is None:
            return None
        self._entries.move_to_end(key)
        value = decode_value(blob)
        if value is None:
            self._drop(key)
        return value

    async def put(self, key: str, value: CachedTensors) -> None:
        blob = encode_value(value)
        if len(blob) > self._max_bytes:
            return
        self._drop(key)
        self._entries[key] = blob
        self._bytes += len(blob)
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        blob = self._entries.pop(key, None)
        if blob is not None:
            self._bytes -= len(blob)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0


class RedisCache:
    """Encodings in Redis; an outage means misses and a log line, never an error."""

    def __init__(self, settings: CacheSettings) -> None:
        self.description = f"Redis at {settings.redis_url}"
        self._settings = settings
        options: dict[str, Any] = {}
        if settings.redis_password_file:
            options["password"] = Path(settings.redis_password_file).read_text().strip()
        if settings.redis_url.startswith("rediss://"):
            options.update(
                ssl_ca_certs=settings.redis_ca_file or None,
                ssl_certfile=settings.redis_cert_file or None,
                ssl_keyfile=settings.redis_key_file or None,
            )
        self._client = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.socket_timeout_seconds,
            socket_connect_timeout=settings.socket_timeout_seconds,
            **options,
        )
        self._down_until = 0.0
        self._down = False

    def _available(self) -> bool:
        return not self._down or time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        if not self._down:
            logger.warning(
                "Redis at %s is unavailable (%s); serving without cache, retrying every %.0fs",
                self._settings.redis_url,
                exc,
                self._settings.retry_seconds,
            )
        self._down = True
        self._down_until = time.monotonic() + self._settings.retry_seconds

    def _succeeded(self) -> None:
        if self._down:
            logger.warning("Redis at %s is back; caching again", self._settings.redis_url)
        self._down = False

    async def get(self, key: str) -> CachedTensors | None:
        if not self._available():
            return None
        try:
            blob = await self._client.get(key)
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._succeeded()
        if blob is None:
            return None
        value = await asyncio.to_thread(decode_value, blob)  # the checksum over MBs stays off the loop
        if value is None:
            logger.warning("cache value %s is corrupt or of another format; deleting it", key)
            try:
                await self._client.delete(key)
            except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
                self._failed(exc)
        return value

    async def put(self, key: str, value: CachedTensors) -> None:
        if not self._available():
            return
        try:
            ttl = self._settings.ttl_seconds or None
            await self._client.set(key, await asyncio.to_thread(encode_value, value), ex=ttl)
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            self._failed(exc)
            return
        self._succeeded()

    async def close(self) -> None:
        await self._client.aclose()


class WriteBehind:
    """Cache writes off the critical path: a call queues its writes, and they start once its answer
    is ready, never awaited by it. A write that fails is logged and skipped; :meth:`close` waits for
    the writes still running (shutdown)."""

    def __init__(self, cache: TokenCache) -> None:
        self._cache = cache
        self._tasks: set[asyncio.Task] = set()

    def start(self, writes: list[tuple[str, Callable[[], CachedTensors | None]]]) -> None:
        """Write each ``(key, value)`` in the background, in order; ``value`` is called in a thread
        (it may copy tensors off the device) and ``None`` from it means nothing to write."""
        if not writes:
            return
        task = asyncio.get_running_loop().create_task(self._write(list(writes)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, writes: list[tuple[str, Callable[[], CachedTensors | None]]]) -> None:
        for key, value in writes:
            try:
                cached = await asyncio.to_thread(value)
                if cached is not None:
                    await self._cache.put(key, cached)
            except Exception:
                logger.warning("cache write of %s failed; it stays uncached", key, exc_info=True)

    @property
    def pending(self) -> int:
        """How many calls' writes are still running."""
        return len(self._tasks)

    async def settled(self) -> None:
        """Return once every write started so far has ended."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self, grace_seconds: float) -> None:
        """Wait up to ``grace_seconds`` for the writes still running, then cancel the rest."""
        if not self._tasks:
            return
        _, unfinished = await asyncio.wait(set(self._tasks), timeout=grace_seconds)
        if unfinished:
            logger.warning(
                "%d calls' cache writes did not end within %.0fs of shutdown; they are dropped",
                len(unfinished),
                grace_seconds,
            )
            for task in unfinished:
                task.cancel()
            await asyncio.wait(unfinished)


def create_cache(settings: CacheSettings) -> TokenCache:
    """The cache the settings ask for, saying which in the log."""
    cache: TokenCache
    if not settings.enabled:
        cache = NullCache()
    elif settings.redis_url:
        cache = RedisCache(settings)
    else:
        cache = InProcessCache(settings.in_process_max_bytes)
        logger.warning("no Redis URL configured: using an in-process cache of encodings")
    logger.info("encoding cache: %s", cache.description)
    return cache
