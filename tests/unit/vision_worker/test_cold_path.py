"""The cold path wastes nothing: CLIP's vision tower once per image, its text tower once per
question, Analyze's tokens handed to Encode from memory, cache writes after the answer."""

import asyncio
import logging
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from compressor_plugins.registry import PluginSettings, load_compressors
from vision_worker.cache import CachedTensors, InProcessCache
from vision_worker.encoder import EncodeItem, VisionEncoder
from vision_worker.features import FeatureEntry, FeatureMemory, KeptTokens
from vision_worker.images import ImageLimits
from vision_worker.models import FeatureRequest, VisionModels


class CountingCache(InProcessCache):
    """The in-process cache, counting reads and writes by kind of key (features, tokens, question)."""

    def __init__(self) -> None:
        super().__init__(1 << 28)
        self.reads: list[str] = []
        self.writes: list[str] = []

    async def get(self, key):
        self.reads.append(key.split(":")[1])
        return await super().get(key)

    async def put(self, key, value):
        self.writes.append(key.split(":")[1])
        await super().put(key, value)


@pytest.fixture(scope="module")
def models(tiny_pack):
    return VisionModels(tiny_pack)


@pytest.fixture(scope="module")
def registry():
    return load_compressors(PluginSettings())


def new_encoder(models, registry, cache) -> VisionEncoder:
    return VisionEncoder(models, registry, cache, ImageLimits())


@contextmanager
def forwards(models):
    """CLIP forwards while the block runs: {"vision": n, "text": n}."""
    counts = {"vision": 0, "text": 0}

    def count(tower):
        return lambda *_: counts.__setitem__(tower, counts[tower] + 1)

    hooks = [
        models.clip.vision_model.embeddings.register_forward_pre_hook(count("vision")),
        models.clip.text_model.register_forward_pre_hook(count("text")),
    ]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


async def request(encoder, item: EncodeItem):
    """One request's two calls, as the orchestrator makes them: Analyze, then Encode."""
    [analysis] = await encoder.analyze([item])
    [encoded] = await encoder.encode([item])
    return analysis, encoded


def test_a_cold_request_runs_clip_once_and_encode_reads_nothing_back(models, registry, png):
    async def scenario():
        cache = CountingCache()
        encoder = new_encoder(models, registry, cache)
        item = EncodeItem(png(20), "avgpool", {"stride": 2})
        with forwards(models) as counts:
            [analysis] = await encoder.analyze([item])
            assert counts == {"vision": 1, "text": 0}
            reads = len(cache.reads)
            [encoded] = await encoder.encode([item])
        assert counts == {"vision": 1, "text": 0}  # Encode ran no forward
        assert cache.reads[reads:] == []  # and read neither features nor tokens back from the cache
        # Computed for this request, handed over: not a cache hit.
        assert not encoded.cache_hit and encoded.tokens_after == analysis.natural_tokens == 144
        await encoder.writes.settled()
        assert sorted(cache.writes) == ["features", "tokens"]  # each written once, after the answers
        with forwards(models) as warm:
            again, repeated = await request(encoder, item)
        # The same image again: Analyze read the tokens from the cache, so Encode's are a hit.
        assert warm == {"vision": 0, "text": 0} and again.features_cached and repeated.cache_hit
        await encoder.close()

    asyncio.run(scenario())


def test_a_new_question_on_a_known_image_runs_only_the_text_tower_and_a_repeated_one_nothing(models, registry, png):
    async def scenario():
        encoder = new_encoder(models, registry, CountingCache())
        image, other = png(21), png(22)

        def ask(data, question):
            return request(encoder, EncodeItem(data, "text_recovery", question=question))

        with forwards(models) as cold:
            _, first = await ask(image, "What colour is the sky?")
        with forwards(models) as new_question:
            _, second = await ask(image, "How many dogs are there?")
        with forwards(models) as same_question:
            _, again = await ask(image, "How many dogs are there?")
        with forwards(models) as known_question:
            await ask(other, "How many dogs are there?")
        assert cold == {"vision": 1, "text": 1}
        assert new_question == {"vision": 0, "text": 1}
        assert same_question == {"vision": 0, "text": 0}
        assert known_question == {"vision": 1, "text": 0}
        assert first.cache_key != second.cache_key  # the tokens depend on the question
        assert again.cache_key == second.cache_key
        np.testing.assert_array_equal(again.tokens, second.tokens)
        await encoder.close()

    asyncio.run(scenario())


def test_an_images_complexity_is_computed_once_whatever_the_question_or_budget(models, registry, png, monkeypatch):
    import vision_worker.features

    computed = []
    complexity = vision_worker.features.image_complexity
    monkeypatch.setattr(
        vision_worker.features, "image_complexity", lambda *args: computed.append(1) or complexity(*args)
    )

    async def scenario():
        encoder = new_encoder(models, registry, CountingCache())
        image = png(26)
        first, _ = await request(encoder, EncodeItem(image, "text_recovery", question="What colour is the sky?"))
        second, _ = await request(encoder, EncodeItem(image, "text_recovery", question="How many dogs are there?"))
        [capped] = await encoder.encode([EncodeItem(image, "avgpool", max_tokens=36)])
        assert first.complexity == second.complexity == capped.complexity is not None
        await encoder.close()

    asyncio.run(scenario())
    assert len(computed) == 1


def test_one_question_asked_of_several_images_runs_the_text_tower_once(models, registry, png):
    async def scenario():
        encoder = new_encoder(models, registry, CountingCache())
        items = [EncodeItem(png(seed), "text_recovery", question="Where is the cat?") for seed in (23, 24, 25)]
        with forwards(models) as counts:
            await encoder.analyze(items)
        assert counts["text"] == 1
        await encoder.close()

    asyncio.run(scenario())


def test_features_are_shared_by_every_compressor_and_question(models, registry, png):
    async def scenario():
        encoder = new_encoder(models, registry, CountingCache())
        image = png(26)
        with forwards(models) as counts:
            [plain] = await encoder.analyze([EncodeItem(image, "avgpool")])
            # text_recovery needs the last layer: one forward computes it and keeps what avgpool had.
            [deep] = await encoder.analyze([EncodeItem(image, "text_recovery", question="Why?")])
            # Everything a compressor may need short of every hidden state is now held.
            later = await encoder.analyze([EncodeItem(image, name) for name in ("none", "dfmr", "staged_pool")])
        assert counts["vision"] == 2
        assert not plain.features_cached and not deep.features_cached
        assert all(a.features_cached for a in later)
        assert len(encoder.features) == 1  # one feature set for the image
        await encoder.close()

    asyncio.run(scenario())


def test_features_in_the_cache_serve_another_worker_without_clip(models, registry, png):
    async def scenario():
        cache = CountingCache()
        first, second = new_encoder(models, registry, cache), new_encoder(models, registry, cache)
        item = EncodeItem(png(27), "text_recovery", question="Is it raining?")
        await request(first, item)
        await first.writes.settled()
        other = EncodeItem(png(27), "avgpool")
        with forwards(models) as counts:
            [analysis] = await second.analyze([other])
            await second.analyze([EncodeItem(png(27), "text_recovery", question="Is it raining?")])
        assert counts == {"vision": 0, "text": 0} and analysis.features_cached
        await first.close()
        await second.close()

    asyncio.run(scenario())


class BlockingCache(InProcessCache):
    """A cache whose writes never end."""

    def __init__(self) -> None:
        super().__init__(1 << 28)
        self.started = 0

    async def put(self, key, value):
        self.started += 1
        await asyncio.Event().wait()


def test_a_cache_whose_writes_never_end_does_not_delay_the_answer(models, registry, png, caplog):
    async def scenario():
        cache = BlockingCache()
        encoder = new_encoder(models, registry, cache)
        item = EncodeItem(png(28), "avgpool")
        _, encoded = await asyncio.wait_for(request(encoder, item), timeout=60)
        assert encoded.tokens_after == 144
        await asyncio.sleep(0.05)
        assert cache.started >= 1 and encoder.writes.pending >= 1
        with caplog.at_level(logging.WARNING, logger="vision_worker.cache"):
            await asyncio.wait_for(encoder.close(grace_seconds=0.1), timeout=10)
        assert encoder.writes.pending == 0

    asyncio.run(scenario())
    assert any("cache writes did not end" in r.getMessage() for r in caplog.records)


class SlowCache(InProcessCache):
    """A cache whose writes take a while."""

    def __init__(self) -> None:
        super().__init__(1 << 28)
        self.written: list[str] = []

    async def put(self, key, value):
        await asyncio.sleep(0.2)
        self.written.append(key.split(":")[1])
        await super().put(key, value)


def test_close_waits_for_the_writes_still_running(models, registry, png):
    async def scenario():
        cache = SlowCache()
        encoder = new_encoder(models, registry, cache)
        await encoder.analyze([EncodeItem(png(29), "avgpool")])
        assert cache.written == []  # the answer came before any write ended
        await encoder.close()
        assert sorted(cache.written) == ["features", "tokens"]

    asyncio.run(scenario())


class FailingCache(InProcessCache):
    def __init__(self) -> None:
        super().__init__(1 << 28)

    async def put(self, key, value):
        raise RuntimeError("disk on fire")


def test_a_failed_write_is_logged_never_raised(models, registry, png, caplog):
    async def scenario():
        encoder = new_encoder(models, registry, FailingCache())
        with caplog.at_level(logging.WARNING, logger="vision_worker.cache"):
            _, encoded = await request(encoder, EncodeItem(png(30), "avgpool"))
            await encoder.close()
        return encoded

    assert asyncio.run(scenario()).tokens_after == 144
    assert any("cache write of squint:features:v2:" in r.getMessage() for r in caplog.records)


def test_kept_tokens_count_against_the_feature_memory_bound(models):
    image = Image.new("RGB", (336, 336), (10, 20, 30))
    entry = FeatureEntry(models.features(image, FeatureRequest().image_part()))
    size = entry.nbytes()
    tokens = KeptTokens(CachedTensors({"tokens": np.zeros((size // 4,), np.float32)}, {}), cached=False)
    memory = FeatureMemory(max_bytes=2 * size + 16)
    memory.put("a", entry)
    memory.keep_tokens("a", "t", tokens)
    assert memory.nbytes == 2 * size
    assert memory.take_tokens("a", "t") is tokens and memory.take_tokens("a", "t") is None  # handed over once
    assert memory.nbytes == size
    memory.keep_tokens("a", "t", tokens)
    memory.put("b", FeatureEntry(entry.features))  # over the bound: the oldest entry goes, its tokens too
    assert memory.get("a") is None and memory.nbytes == size
