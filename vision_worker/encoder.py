"""The vision worker's transport-free core: decode, CLIP, compress, project, cache.

A cold request wastes nothing: CLIP's vision tower runs once per image (its features shared by
every compressor and question), the text tower once per question, the tokens Analyze produced are
handed to the request's Encode from memory, and every cache write starts once a call has answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from compressor_plugins.protocol import (
    CompressedImage,
    Compressor,
    CompressorInput,
    FitsBudget,
    LLMDirective,
    OutputSpace,
    canonical_params,
    create_compressor,
    resolve_params,
)
from compressor_plugins.registry import CompressorRegistry, PluginLoadError
from squint.aio import gather_or_cancel
from squint.errors import BudgetExceeded, InvalidRequest
from vision_worker.batching import BatchingSettings, MicroBatcher
from vision_worker.cache import (
    CachedTensors,
    TokenCache,
    WriteBehind,
    features_key,
    question_key,
    tokens_key,
)
from vision_worker.features import (
    FeatureEntry,
    FeatureMemory,
    KeptTokens,
    QuestionMemory,
    from_arrays,
    holds,
    to_arrays,
    widened,
)
from vision_worker.images import ImageLimits, content_hash, load_rgb, open_image
from vision_worker.metrics import VisionMetrics
from vision_worker.models import FeatureRequest, VisionModels

logger = logging.getLogger(__name__)

# Settings whose resolved parameters are kept (a handful are in use at any time).
_RESOLVED_PARAMS_KEPT = 256

# A call's cache writes: (key, a function giving the value, run in a thread when the write starts).
_Writes = list[tuple[str, Callable[[], CachedTensors | None]]]


@dataclass(frozen=True)
class EncodeItem:
    """One image to encode, as the request gave it."""

    data: bytes
    compressor: str = ""  # empty: the worker's default
    params: Mapping[str, Any] = field(default_factory=dict)
    question: str = ""
    max_tokens: int = 0  # 0: unbounded
    label: str = ""  # how errors name this item, e.g. "chunks[2].image"


@dataclass(frozen=True)
class EncodedItem:
    """The compressed tokens of one image, in LLM space, with their accounting: ``pb.EncodedImage``'s
    side here (``vision_worker.service.encoded_image_to_proto``)."""

    tokens: np.ndarray  # [tokens_after, llm_hidden]
    tokens_before: int
    tokens_after: int
    cache_hit: bool
    cache_key: str
    encode_ms: float
    compressor: str
    content_hash: str
    covers: tuple[tuple[int, ...], ...] = ()  # per output token, the patches it covers
    complexity: float | None = None
    directive: LLMDirective | None = None
    grid: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class _Computed:
    """An image's compressed tokens and what is known of them besides: what the token cache
    holds, read and written by :meth:`from_cached` and :meth:`to_cached` only."""

    tokens: np.ndarray  # [m, llm_hidden]
    tokens_before: int  # the CLIP patch count
    grid: tuple[int, int]  # (grid_height, grid_width) of the CLIP features
    covers: tuple[tuple[int, ...], ...]  # per output token, the patches it covers
    complexity: float | None
    directive: LLMDirective | None

    def to_cached(self) -> CachedTensors:
        return CachedTensors(
            {"tokens": self.tokens},
            {
                "tokens_before": self.tokens_before,
                "grid": list(self.grid),
                "covers": [list(c) for c in self.covers],
                "complexity": self.complexity,
                "directive": None if self.directive is None else dataclasses.asdict(self.directive),
            },
        )

    @classmethod
    def from_cached(cls, cached: CachedTensors | None) -> _Computed | None:
        """The cached encoding, or ``None`` when there is none (or it lacks what an answer needs)."""
        if cached is None or "tokens_before" not in cached.meta or "tokens" not in cached.tensors:
            return None
        meta = cached.meta
        directive = meta.get("directive")
        return cls(
            tokens=cached.tensors["tokens"],
            tokens_before=int(meta["tokens_before"]),
            grid=tuple(meta.get("grid", (0, 0))),
            covers=tuple(tuple(c) for c in meta.get("covers", ())),
            complexity=meta.get("complexity"),
            directive=LLMDirective(**directive) if directive else None,
        )


@dataclass(frozen=True)
class ImageAnalysis:
    """What one image costs under a compressor setting, from its CLIP features."""

    grid: tuple[int, int]
    tokens_before: int
    natural_tokens: int  # what the compressor gives this image unconstrained
    levels: tuple[int, ...]  # every count it can be held to, descending from natural_tokens
    complexity: float | None
    descriptor: np.ndarray  # [d] unit-norm mean patch feature: near-identical frames are near 1 apart in cosine
    content_hash: str
    features_cached: bool  # CLIP did not run: the features were kept from before


@dataclass(frozen=True)
class _Resolved:
    """An item whose compressor and parameters were checked and whose image was decoded."""

    index: int
    label: str
    compressor: Compressor
    params: dict[str, Any]  # resolved against the compressor's ParamSpecs
    image_hash: str
    natural_key: str  # tokens key of the unconstrained output
    features_key: str  # the image's CLIP features, whatever the compressor or question
    question_key: str | None  # the question's text embedding, when the compressor reads it
    request: FeatureRequest
    item: EncodeItem


def _descriptor(patches: torch.Tensor) -> np.ndarray:
    """The unit-norm mean patch feature [d]: frames that look alike have descriptors near 1 in cosine."""
    return torch.nn.functional.normalize(patches.float().mean(dim=0), dim=0).cpu().numpy()


class VisionEncoder:
    """Turns image bytes into LLM-ready visual tokens with a registered compressor."""

    def __init__(
        self,
        models: VisionModels,
        registry: CompressorRegistry,
        cache: TokenCache,
        limits: ImageLimits,
        default_compressor: str = "none",
        cache_key_prefix: str = "squint",
        feature_memory_bytes: int = 1 << 30,
        cache_hidden_states: bool = False,
        metrics: VisionMetrics | None = None,
        batching: BatchingSettings = BatchingSettings(),
    ) -> None:
        self.models = models
        self.registry = registry
        self.cache = cache
        self.cache_key_prefix = cache_key_prefix
        self.limits = limits
        self.default_compressor = default_compressor
        self.features = FeatureMemory(feature_memory_bytes)
        self.questions = QuestionMemory()
        self.writes = WriteBehind(cache)
        self._question_loads: dict[str, asyncio.Task] = {}  # one text forward per question at a time
        self.metrics = metrics or VisionMetrics()
        self._cache_hidden_states = cache_hidden_states
        self._dtype_name = str(models.dtype).removeprefix("torch.")
        self._compressors: dict[str, Compressor] = {}
        self._resolved_params: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._resolved_params_lock = threading.Lock()  # items are resolved in worker threads
        self._smallest: dict[tuple[str, str], int] = {}  # by setting: fixed for the pack
        for entry in registry:
            folder = models.pack.compressor_dirs.get(entry.cls.name)
            try:
                compressor = create_compressor(entry.cls, folder, models.device, models.dtype)
            except Exception as exc:  # whatever a plugin raises: start-up names it and stops
                raise PluginLoadError(
                    f"compressor {entry.cls.name!r} of plugin {entry.plugin!r} ({entry.distribution} {entry.version}) "
                    f"failed to initialise from {folder}: {type(exc).__name__}: {exc}. Fix its files, or deny it "
                    f"with SQUINT_VISION_PLUGINS_DENY={entry.plugin}"
                ) from exc
            self._compressors[entry.cls.name] = compressor
        self.registry.get(default_compressor)  # fail start-up on a bad default
        # One forward at a time: torch already uses every core for one.
        self._compute_lock = asyncio.Lock()
        self.batcher = MicroBatcher(models.features_many, self._compute_lock, batching, self.metrics)

    def warm_up(self) -> None:
        """One forward through CLIP's two towers and the projector, so the first request is not the slow one."""
        side = getattr(self.models.image_processor, "crop_size", {}).get("height", 336)
        image = Image.new("RGB", (side, side), (128, 128, 128))
        features = self.models.features(image, FeatureRequest())
        self.models.project(features.patch_features)
        self.models.embed_question("What is in the picture?")

    def compressor(self, name: str) -> Compressor:
        name = name or self.default_compressor
        self.registry.get(name)  # raises CompressorNotFound with the list of names
        return self._compressors[name]

    def smallest(self, compressor_name: str, raw_params: Mapping[str, Any]) -> int:
        """The fewest tokens any image can be held to under this setting, from the pack's grid and
        the compressor's declarations (no image, no CLIP); 0 when only an image can tell."""
        compressor = self.compressor(compressor_name)
        params = self._params(compressor, raw_params)
        grid = self.models.grid
        predicted = compressor.predict_tokens(grid, params)
        if not isinstance(compressor, FitsBudget):
            return int(predicted) if predicted is not None else 0
        # Every natural count an image could have (the protocol does not promise that the largest
        # one's ladder reaches lowest), once per setting.
        key = (compressor.name, repr(sorted(params.items())))
        if key not in self._smallest:
            naturals = [predicted] if predicted is not None else range(1, grid[0] * grid[1] + 1)
            self._smallest[key] = int(min(min(compressor.token_levels(grid, params, n)) for n in naturals))
            while len(self._smallest) > _RESOLVED_PARAMS_KEPT:
                self._smallest.pop(next(iter(self._smallest)))
        return self._smallest[key]

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise InvalidRequest("the request has no images")
        if n > self.limits.max_images_per_request:
            raise InvalidRequest(
                f"the request has {n} images; the limit is "
                f"{self.limits.max_images_per_request} (max_images_per_request)"
            )

    def _resolve(self, index: int, item: EncodeItem) -> tuple[_Resolved, Any]:
        label = item.label or f"items[{index}].image"
        compressor = self.compressor(item.compressor)
        params = self._params(compressor, item.params)
        image = open_image(item.data, self.limits, label)  # header only; decoded in the compute thread
        image_hash = content_hash(item.data)
        request = FeatureRequest.for_needs(compressor.needs, item.question)
        question_hash = self._question_hash(compressor, item.question)
        natural_key = tokens_key(
            self.cache_key_prefix,
            image_hash=image_hash,
            pack_id=self.models.pack.id,
            feature_layer=self.models.feature_layer,
            compressor=self._compressor_identity(compressor),
            params=canonical_params(params),
            dtype=self._dtype_name,
            question_hash=question_hash,
        )
        key = features_key(
            self.cache_key_prefix,
            image_hash=image_hash,
            pack_id=self.models.pack.id,
            dtype=self._dtype_name,
            feature_layer=self.models.feature_layer,
        )
        text_key = (
            None
            if question_hash is None
            else question_key(
                self.cache_key_prefix, pack_id=self.models.pack.id, dtype=self._dtype_name, question_hash=question_hash
            )
        )
        resolved = _Resolved(index, label, compressor, params, image_hash, natural_key, key, text_key, request, item)
        return resolved, image

    def _params(self, compressor: Compressor, raw: Mapping[str, Any]) -> dict[str, Any]:
        """``raw`` resolved against the compressor's ParamSpecs (validated, coerced, defaults
        filled): once per setting, not once per item of every call (Analyze and Encode, and the
        items of a request, share one setting). Each item gets its own copy of the values."""
        key = (compressor.name, repr(sorted(raw.items())))
        with self._resolved_params_lock:
            resolved = self._resolved_params.get(key)
            if resolved is not None:
                self._resolved_params.move_to_end(key)
                return dict(resolved)
        resolved = resolve_params(compressor, raw)  # InvalidRequest for a bad setting
        with self._resolved_params_lock:
            self._resolved_params[key] = resolved
            while len(self._resolved_params) > _RESOLVED_PARAMS_KEPT:
                self._resolved_params.popitem(last=False)
        return dict(resolved)

    def _compressor_identity(self, compressor: Compressor) -> str:
        """Name and provenance: a plugin upgrade must not serve the old version's cached tokens."""
        entry = self.registry.get(compressor.name)
        return f"{compressor.name}@{entry.distribution}=={entry.version}"

    @staticmethod
    def _question_hash(compressor: Compressor, question: str) -> str | None:
        if CompressorInput.QUESTION_EMBEDDING not in compressor.needs:
            return None
        return hashlib.sha256(question.encode()).hexdigest()

    def _tokens_key(self, resolved: _Resolved) -> str:
        """The key this item's tokens are cached under: the unconstrained key unless a budget-
        fitting compressor is held below its natural count (when known)."""
        limit = resolved.item.max_tokens
        if not limit or not isinstance(resolved.compressor, FitsBudget):
            return resolved.natural_key
        entry = self.features.get(resolved.features_key)
        natural = entry.naturals.get(resolved.natural_key) if entry is not None else None
        if natural is not None and limit >= natural:
            return resolved.natural_key
        return tokens_key(
            self.cache_key_prefix,
            image_hash=resolved.image_hash,
            pack_id=self.models.pack.id,
            feature_layer=self.models.feature_layer,
            compressor=self._compressor_identity(resolved.compressor),
            params=canonical_params(resolved.params),
            dtype=self._dtype_name,
            question_hash=self._question_hash(resolved.compressor, resolved.item.question),
            budget=limit,
        )

    async def _features(self, resolved: _Resolved, image: Any, writes: _Writes) -> tuple[FeatureEntry, bool]:
        """The image's features, holding what this item's compressor needs: from this worker's
        memory, from Redis, or from CLIP (in that order); the flag says whether CLIP was spared.
        A CLIP forward also computes what the features it replaces held, so one set per image
        serves every compressor asked of it; its write to Redis joins the call's ``writes``."""
        entry = self.features.get(resolved.features_key)
        if entry is not None and holds(entry.features, resolved.request):
            self.metrics.cache.labels(level="features", outcome="hit").inc()
            return entry, True
        previous = entry.features if entry is not None else None
        if entry is None:
            cached = await self.cache.get(resolved.features_key)
            if cached is not None and "grid" in cached.meta:
                previous = from_arrays(cached.tensors, tuple(cached.meta["grid"]), self.models.device)
                if holds(previous, resolved.request):
                    self.metrics.cache.labels(level="features", outcome="hit").inc()
                    entry = FeatureEntry(previous)
                    self.features.put(resolved.features_key, entry)
                    return entry, True
        self.metrics.cache.labels(level="features", outcome="miss").inc()
        rgb = await asyncio.to_thread(load_rgb, image, resolved.label)
        features = await self.batcher.submit(rgb, widened(previous, resolved.request))
        if entry is None:
            entry = FeatureEntry(features)
        else:  # what was learnt of the narrower set holds for this one
            entry = FeatureEntry(features, entry.naturals, entry.kept)
        self.features.put(resolved.features_key, entry)
        include_hidden = self._cache_hidden_states
        writes.append(
            (
                resolved.features_key,
                lambda: CachedTensors(to_arrays(features, include_hidden), {"grid": list(features.grid)}),
            )
        )
        return entry, False

    async def _question(self, resolved: _Resolved, writes: _Writes) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The question's CLIP text embedding (pooled, last position) when the compressor reads it:
        from this worker's memory, from Redis, or from the text tower, once per question however
        many images of a call ask it."""
        key = resolved.question_key
        if key is None:
            return None
        found = self.questions.get(key)
        if found is not None:
            self.metrics.cache.labels(level="question", outcome="hit").inc()
            return found
        load = self._question_loads.get(key)
        if load is None:
            load = asyncio.ensure_future(self._load_question(key, resolved.item.question, writes))
            self._question_loads[key] = load
            load.add_done_callback(lambda _: self._question_loads.pop(key, None))
        else:
            self.metrics.cache.labels(level="question", outcome="hit").inc()
        return await asyncio.shield(load)

    async def _load_question(self, key: str, question: str, writes: _Writes) -> tuple[torch.Tensor, torch.Tensor]:
        cached = await self.cache.get(key)
        if cached is not None and {"pooled", "last_position"} <= cached.tensors.keys():
            self.metrics.cache.labels(level="question", outcome="hit").inc()
            pooled, last = (
                torch.from_numpy(cached.tensors[n]).to(self.models.device) for n in ("pooled", "last_position")
            )
        else:
            self.metrics.cache.labels(level="question", outcome="miss").inc()
            pooled, last = await self._locked(self.models.embed_question, "text", question)
            writes.append(
                (
                    key,
                    lambda: CachedTensors(
                        {"pooled": pooled.detach().cpu().numpy(), "last_position": last.detach().cpu().numpy()}, {}
                    ),
                )
            )
        self.questions.put(key, (pooled, last))
        return pooled, last

    async def analyze(self, items: Sequence[EncodeItem]) -> list[ImageAnalysis]:
        """CLIP each image (features kept for Encode), compress it unconstrained (tokens cached),
        and report its count, the counts it can be held to, its complexity and a descriptor."""
        self._check_count(len(items))
        prepared = await self._prepare(items)
        writes: _Writes = []
        try:
            with self._call("analyze", prepared):
                # Concurrently, so the items' CLIP forwards can share batches.
                return await gather_or_cancel(
                    *(self._analyze_one(resolved, image, writes) for resolved, image in prepared)
                )
        finally:
            self.writes.start(writes)

    async def _prepare(self, items: Sequence[EncodeItem]) -> list[tuple[_Resolved, Any]]:
        """Validate every item (hashing and header parsing run off the event loop)."""
        return await asyncio.to_thread(lambda: [self._resolve(index, item) for index, item in enumerate(items)])

    @contextlib.contextmanager
    def _call(self, method: str, prepared: list[tuple[_Resolved, Any]]):
        started = time.perf_counter()
        self.metrics.calls.labels(method=method).inc()
        for resolved, _ in prepared:
            self.metrics.items.labels(method=method, compressor=resolved.compressor.name).inc()
        try:
            yield
        finally:
            self.metrics.latency.labels(method=method).observe(time.perf_counter() - started)

    async def _analyze_one(self, resolved: _Resolved, image: Any, writes: _Writes) -> ImageAnalysis:
        entry, features_cached = await self._features(resolved, image, writes)
        computed, hit = await self._stored(resolved, resolved.natural_key)
        if computed is None:
            computed = await self._compute(resolved, entry, resolved.natural_key, None, writes)
        natural = int(computed.tokens.shape[0])
        entry.naturals[resolved.natural_key] = natural
        # Handed to this request's Encode, which would otherwise read them back from Redis.
        self.features.keep_tokens(resolved.features_key, resolved.natural_key, KeptTokens(computed.to_cached(), hit))
        compressor = resolved.compressor
        grid = entry.features.grid
        levels = (
            tuple(compressor.token_levels(grid, resolved.params, natural))
            if isinstance(compressor, FitsBudget)
            else (natural,)
        )
        descriptor = await asyncio.to_thread(_descriptor, entry.features.patch_features)  # [d]
        return ImageAnalysis(
            grid=grid,
            tokens_before=grid[0] * grid[1],
            natural_tokens=natural,
            levels=levels,
            complexity=computed.complexity,
            descriptor=descriptor,
            content_hash=resolved.image_hash,
            features_cached=features_cached,
        )

    async def encode(self, items: Sequence[EncodeItem]) -> list[EncodedItem]:
        """Encode every item, each held to its ``max_tokens``; all are validated before any runs."""
        self._check_count(len(items))
        prepared = await self._prepare(items)
        writes: _Writes = []
        try:
            with self._call("encode", prepared):
                return await gather_or_cancel(
                    *(self._encode_one(resolved, image, writes) for resolved, image in prepared)
                )
        finally:
            self.writes.start(writes)

    async def close(self, grace_seconds: float = 10.0) -> None:
        """Shut down: wait (up to ``grace_seconds``) for the cache writes still running, then close
        the cache."""
        await self.writes.close(grace_seconds)
        await self.cache.close()

    async def _encode_one(self, resolved: _Resolved, image: Any, writes: _Writes) -> EncodedItem:
        started = time.perf_counter()
        key = self._tokens_key(resolved)
        computed, hit = await self._stored(resolved, key)
        if key != resolved.natural_key:  # held to a cap: what Analyze kept is not wanted
            self.features.take_tokens(resolved.features_key, resolved.natural_key)
        if computed is None:
            entry = self.features.get(resolved.features_key)
            if entry is None or not holds(entry.features, resolved.request):  # not analyzed here
                entry, _ = await self._features(resolved, image, writes)
            budget = None if key == resolved.natural_key else resolved.item.max_tokens
            computed = await self._compute(resolved, entry, key, budget, writes)
        self._check_budget(resolved, computed.tokens.shape[0])
        self.metrics.tokens.labels(stage="before").inc(computed.tokens_before)
        self.metrics.tokens.labels(stage="after").inc(int(computed.tokens.shape[0]))
        return self._item(resolved, computed, key, hit, started)

    async def _stored(self, resolved: _Resolved, key: str) -> tuple[_Computed | None, bool]:
        """The tokens under ``key`` when they exist: kept by this request's Analyze (no cache
        lookup; a hit only when Analyze read them from the cache), or in the cache (a hit)."""
        kept = self.features.take_tokens(resolved.features_key, key)
        if kept is not None:
            computed = _Computed.from_cached(kept.value)
            if computed is not None:
                return computed, kept.cached
        computed = _Computed.from_cached(await self.cache.get(key))
        self.metrics.cache.labels(level="tokens", outcome="miss" if computed is None else "hit").inc()
        return computed, computed is not None

    async def _compute(
        self, resolved: _Resolved, entry: FeatureEntry, key: str, budget: int | None, writes: _Writes
    ) -> _Computed:
        """Compress the features (with the question's embedding when the compressor reads it); the
        tokens' write to the cache joins the call's ``writes``."""
        features = entry.features
        question = await self._question(resolved, writes)
        if question is not None:
            pooled, last = question
            features = dataclasses.replace(features, question_embedding=pooled, question_embedding_last_position=last)
        computed = await self._locked(self._compress, "compress", resolved, features, budget, entry)
        writes.append((key, computed.to_cached))
        return computed

    async def _locked(self, work, stage: str, *args):
        """Run ``work`` off the event loop, one at a time, timing the wait and the work."""
        waited = time.perf_counter()
        async with self._compute_lock:
            started = time.perf_counter()
            self.metrics.queue.observe(started - waited)
            job = asyncio.ensure_future(asyncio.to_thread(work, *args))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                # The thread cannot be stopped: hold the lock until it ends, so the next forward
                # never overlaps it (the q/k capture hooks sit on shared modules).
                with contextlib.suppress(Exception):
                    await job
                raise
            finally:
                self.metrics.compute.labels(stage=stage).observe(time.perf_counter() - started)

    @staticmethod
    def _check_budget(resolved: _Resolved, count: int) -> None:
        limit = resolved.item.max_tokens
        if limit and count > limit:
            raise BudgetExceeded(
                f"compressor {resolved.compressor.name!r} emits {count} visual tokens for {resolved.label}; "
                f"the budget allows {limit}"
            )

    def _item(self, resolved: _Resolved, computed: _Computed, key: str, hit: bool, started: float) -> EncodedItem:
        return EncodedItem(
            tokens=computed.tokens,
            tokens_before=computed.tokens_before,
            tokens_after=int(computed.tokens.shape[0]),
            cache_hit=hit,
            cache_key=key,
            encode_ms=(time.perf_counter() - started) * 1000.0,
            compressor=resolved.compressor.name,
            content_hash=resolved.image_hash,
            covers=computed.covers,
            complexity=computed.complexity,
            directive=computed.directive,
            grid=computed.grid,
        )

    def _compress(self, resolved: _Resolved, features: Any, budget: int | None, entry: FeatureEntry) -> _Computed:
        compressor = resolved.compressor
        if CompressorInput.LLM_TOKENS in compressor.needs and features.llm_tokens is None:
            features = dataclasses.replace(features, llm_tokens=self.models.project(features.patch_features))
        with torch.inference_mode():
            if budget is not None and isinstance(compressor, FitsBudget):
                compressed: CompressedImage = compressor.compress_within(features, resolved.params, budget)
            else:
                compressed = compressor.compress(features, resolved.params)
                budget = None
        self._check_output(resolved, compressed, features.grid, budget)
        tokens = compressed.tokens
        if compressor.output_space is OutputSpace.VISION:
            tokens = self.models.project(tokens)  # [m, llm_hidden]
        # Every item has a complexity for the budget policy: the compressor's own, else σ̄ of its
        # features, computed once per image (a new question or budget on it does not pay again).
        complexity = compressed.complexity
        if complexity is None:
            complexity = entry.complexity()
        return _Computed(
            tokens=tokens.detach().to("cpu", self.models.dtype).numpy(),
            tokens_before=int(features.patch_features.shape[0]),
            grid=tuple(features.grid),
            covers=tuple(tuple(c) for c in compressed.covers),
            complexity=complexity,
            directive=compressed.directive,
        )

    def _check_output(
        self, resolved: _Resolved, compressed: CompressedImage, grid: tuple[int, int], budget: int | None
    ) -> None:
        """A compressor's output must be what it declared; a mismatch is its bug, said plainly."""
        compressor = resolved.compressor
        width = self.models.vision_width if compressor.output_space is OutputSpace.VISION else self.models.llm_width
        count, got_width = compressed.tokens.shape
        problems = []
        if got_width != width:
            problems.append(f"tokens {got_width} wide, expected {width} ({compressor.output_space.value} space)")
        if budget is None:  # over a budget is the client's RESOURCE_EXHAUSTED, checked after
            predicted = compressor.predict_tokens(grid, resolved.params)
            if predicted is not None and count != predicted:
                problems.append(f"{count} tokens, but it predicted {predicted}")
        if count == 0:
            problems.append("no tokens")
        if not compressed.tokens.is_floating_point():
            problems.append(f"dtype {compressed.tokens.dtype}")
        if problems:
            raise RuntimeError(f"compressor {compressor.name!r} returned {'; '.join(problems)} for {resolved.label}")
