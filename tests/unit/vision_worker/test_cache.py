import asyncio
import logging
import uuid

import numpy as np
import pytest

from llm_worker.tritonserver import free_port
from vision_worker.cache import (
    CachedTensors,
    CacheSettings,
    InProcessCache,
    RedisCache,
    decode_value,
    encode_value,
    tokens_key,
)

TOKENS = CachedTensors(
    {"tokens": np.arange(12, dtype=np.float32).reshape(3, 4), "extra": np.ones(2, np.float16)}, {"tokens_before": 576}
)


def test_value_round_trip_without_pickle():
    blob = encode_value(TOKENS)
    assert b"pickle" not in blob and blob.startswith(b"SQT")
    back = decode_value(blob)
    np.testing.assert_array_equal(back.tensors["tokens"], TOKENS.tensors["tokens"])
    assert back.tensors["extra"].dtype == np.float16 and back.meta == {"tokens_before": 576}


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_damaged_values_are_misses(damage):
    blob = bytearray(encode_value(TOKENS))
    if damage == "flip":
        blob[-1] ^= 0xFF
    elif damage == "truncate":
        blob = blob[:-4]
    elif damage == "garbage":
        blob = bytearray(b"SQT\xff\xff\xff\xffnot json")
    else:
        blob = bytearray()
    assert decode_value(bytes(blob)) is None


def test_key_depends_on_everything_that_determines_the_tokens():
    base = dict(
        image_hash="i", pack_id="p", feature_layer=-2, compressor="avgpool", params='{"stride":2}', dtype="float32"
    )
    keys = {tokens_key("squint", **base)}
    changes = [
        ("image_hash", "j"),
        ("pack_id", "q"),
        ("feature_layer", -1),
        ("compressor", "none"),
        ("params", "{}"),
        ("dtype", "float16"),
    ]
    for field, other in changes:
        keys.add(tokens_key("squint", **{**base, field: other}))
    keys.add(tokens_key("squint", **base, question_hash="h"))
    assert len(keys) == 8
    assert tokens_key("squint", **base) == tokens_key("squint", **base)


def test_in_process_cache_is_a_bounded_lru():
    async def scenario():
        one = len(encode_value(TOKENS))
        cache = InProcessCache(max_bytes=2 * one)
        for key in "abc":
            await cache.put(key, TOKENS)
        assert await cache.get("a") is None  # evicted, oldest first
        assert await cache.get("b") is not None and await cache.get("c") is not None

    asyncio.run(scenario())


def test_redis_round_trip_and_corrupt_value_is_deleted(redis_client):
    async def scenario():
        cache = RedisCache(CacheSettings(ttl_seconds=60))
        key = f"squint-test:{uuid.uuid4().hex}"
        try:
            await cache.put(key, TOKENS)
            assert 0 < redis_client.ttl(key) <= 60
            np.testing.assert_array_equal((await cache.get(key)).tensors["tokens"], TOKENS.tensors["tokens"])
            redis_client.setrange(key, 40, b"\x00\x01\x02")  # corrupt it in place
            assert await cache.get(key) is None
            assert not redis_client.exists(key)
        finally:
            redis_client.delete(key)
            await cache.close()

    asyncio.run(scenario())


def test_redis_down_is_a_miss_logged_once(caplog):
    async def scenario():
        cache = RedisCache(CacheSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", retry_seconds=60))
        with caplog.at_level(logging.WARNING, logger="vision_worker.cache"):
            await cache.put("k", TOKENS)
            assert await cache.get("k") is None
            assert await cache.get("k") is None
        await cache.close()

    asyncio.run(scenario())
    warnings = [r for r in caplog.records if "serving without cache" in r.getMessage()]
    assert len(warnings) == 1
