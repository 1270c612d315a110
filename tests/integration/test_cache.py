"""The encoding cache, end to end against real Redis servers."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import time
import uuid
from contextlib import contextmanager

import pytest
import redis

from compressor_plugins.registry import PluginSettings, load_compressors
from squint.app.client import build_request
from vision_worker.cache import CacheSettings, RedisCache, features_key, question_key, tokens_key
from vision_worker.encoder import EncodeItem, VisionEncoder
from vision_worker.images import ImageLimits
from vision_worker.models import VisionModels

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_repeated_request_is_a_cache_hit_stored_under_its_key(
    default_client, tiny_pack, redis_client, png, unseen_seed
):
    image = png(unseen_seed, 240, 240)
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
    # Written once the first call had answered: within moments, not necessarily before the reply.
    deadline = time.monotonic() + 5
    while not redis_client.exists(expected_key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_client.exists(expected_key)
    redis_client.delete(expected_key)


def test_with_redis_stopped_requests_succeed_without_cache_and_the_log_says_so(
    alt_client, alt_stack, private_redis, png, unseen_seed
):
    image = png(unseen_seed, 240, 240)
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


class CountingRedis(RedisCache):
    """The Redis cache, counting reads by kind of key (features, tokens, question)."""

    def __init__(self) -> None:
        super().__init__(CacheSettings(ttl_seconds=600))
        self.reads: list[str] = []

    async def get(self, key):
        self.reads.append(key.split(":")[1])
        return await super().get(key)


@contextmanager
def clip_forwards(models):
    counts = {"vision": 0, "text": 0}
    hooks = [
        module.register_forward_pre_hook(lambda *_, tower=tower: counts.__setitem__(tower, counts[tower] + 1))
        for tower, module in (("vision", models.clip.vision_model.embeddings), ("text", models.clip.text_model))
    ]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def test_the_cold_path_in_redis_one_forward_per_image_and_question_shared_by_replicas(
    tiny_pack, redis_client, png, unseen_seed
):
    """Two vision workers sharing the real Redis: the first's cold request runs CLIP's vision tower
    once and its text tower once, its Encode reads nothing back, and its writes (features under
    the v2 key, the question's embedding) spare the second worker both towers."""
    models = VisionModels(tiny_pack)
    registry = load_compressors(PluginSettings())
    image = png(unseen_seed, 240, 240)
    question = f"What is in picture {uuid.uuid4().hex}?"
    item = EncodeItem(image, "text_recovery", question=question)

    async def scenario():
        first, second = CountingRedis(), CountingRedis()
        one = VisionEncoder(models, registry, first, ImageLimits())
        two = VisionEncoder(models, registry, second, ImageLimits())
        try:
            with clip_forwards(models) as cold:
                await one.analyze([item])
                analyze_reads = len(first.reads)
                [encoded] = await one.encode([item])
            assert cold == {"vision": 1, "text": 1}
            assert first.reads[analyze_reads:] == [] and not encoded.cache_hit  # handed over, computed cold
            await one.writes.settled()
            with clip_forwards(models) as replica:
                [analysis] = await two.analyze([item])
                await two.encode([item])
            assert replica == {"vision": 0, "text": 0} and analysis.features_cached
            with clip_forwards(models) as new_question:
                await two.analyze([EncodeItem(image, "text_recovery", question=question + " And now?")])
            assert new_question == {"vision": 0, "text": 1}
            await two.writes.settled()
        finally:
            await one.close()
            await two.close()

    asyncio.run(scenario())
    keys = [k.decode() for k in redis_client.scan_iter("squint:*", count=10_000)]
    image_hash = hashlib.sha256(image).hexdigest()
    features = features_key(
        "squint", image_hash=image_hash, pack_id=tiny_pack.id, dtype="float32", feature_layer=models.feature_layer
    )
    asked = question_key(
        "squint", pack_id=tiny_pack.id, dtype="float32", question_hash=hashlib.sha256(question.encode()).hexdigest()
    )
    assert features.startswith("squint:features:v2:") and asked.startswith("squint:question:v1:")
    assert features in keys and asked in keys
    redis_client.delete(features, asked)
