"""The encoding cache, end to end against real Redis servers."""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
import uuid

import pytest
import redis

from squint.app.client import build_request
from vision_worker.cache import tokens_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def fresh_image(png) -> bytes:
    # A seed no earlier run used, so the first request is a miss even in a long-lived Redis.
    return png(uuid.uuid4().int % (2**31), 240, 240)


def test_repeated_request_is_a_cache_hit_stored_under_its_key(default_client, tiny_pack, redis_client, png):
    image = fresh_image(png)
    request = build_request("What is it?", [image], compressor="avgpool", params={"stride": 2}, max_new_tokens=4)
    first = default_client.Generate(request, timeout=60)
    second = default_client.Generate(request, timeout=60)
    [miss], [hit] = first.usage.media, second.usage.media
    assert (miss.cache_hit, hit.cache_hit) == (False, True)
    assert (miss.tokens_before, miss.tokens_after) == (576, 144) == (hit.tokens_before, hit.tokens_after)
    assert list(first.token_ids) == list(second.token_ids)
    expected_key = tokens_key(
        "squint",
        image_hash=hashlib.sha256(image).hexdigest(),
        pack_id=tiny_pack.id,
        feature_layer=-2,
        compressor=f"avgpool@squint=={importlib.metadata.version('squint')}",
        params='{"stride":2}',
        dtype="float32",
    )
    assert miss.cache_key == hit.cache_key == expected_key
    assert redis_client.exists(expected_key)
    redis_client.delete(expected_key)


def test_with_redis_stopped_requests_succeed_without_cache_and_the_log_says_so(
    alt_client, alt_stack, private_redis, png
):
    image = fresh_image(png)
    request = build_request("What is it?", [image], compressor="avgpool", max_new_tokens=4)
    log = alt_stack.logs_dir / "vision_worker.log"
    private_redis.stop()
    try:
        for _ in range(2):
            reply = alt_client.Generate(request, timeout=60)
            assert not reply.usage.media[0].cache_hit and len(reply.token_ids) == 4
        assert f"Redis at {private_redis.url} is unavailable" in log.read_text()
        assert "serving without cache" in log.read_text()
    finally:
        private_redis.start()
    # Redis is back: after the worker's retry interval the cache works again.
    time.sleep(1.0)
    alt_client.Generate(request, timeout=60)
    assert alt_client.Generate(request, timeout=60).usage.media[0].cache_hit
    assert "is back; caching again" in log.read_text()
    redis.Redis.from_url(private_redis.url).flushdb()
