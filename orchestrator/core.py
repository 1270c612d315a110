"""The orchestrator's transport-free core: validate, encode images, template, generate, stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from llm_worker.spans import ImageSpan
from orchestrator.admission import StreamLimiter
from orchestrator.budget import POLICIES, Allocation, BudgetItem, allocate, refuse_early
from orchestrator.detokenize import IncrementalDetokenizer
from orchestrator.llm_client import LLMRequest
from orchestrator.llm_workers import LLMWorkers
from orchestrator.media import Media, expand_media, repeated_frames
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.prompting import Prompt, PromptBuilder
from orchestrator.settings import OrchestratorSettings
from orchestrator.types import (
    ROLES,
    Finished,
    FrameCounts,
    GenerationEvent,
    GenerationRequest,
    ImageChunk,
    MediaUsage,
    Message,
    Sampling,
    TextChunk,
    TextDelta,
    Timings,
    Usage,
    VideoChunk,
)
from orchestrator.vision_client import EncodedMedia, ImageToEncode, MediaAnalysis, VisionContext
from orchestrator.vision_workers import VisionWorkers
from squint.errors import BudgetExceeded, InvalidRequest

logger = logging.getLogger(__name__)


def check_conversation(messages: tuple[Message, ...]) -> None:
    """Roles known, media only from the user, and a user message last (the model answers it)."""
    for m, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidRequest(f"messages[{m}].role is {message.role!r}; it must be one of {', '.join(ROLES)}")
        if not message.chunks:
            raise InvalidRequest(f"messages[{m}].content is empty")
        if message.role != "user":
            for c, chunk in enumerate(message.chunks):
                if not isinstance(chunk, TextChunk):
                    raise InvalidRequest(
                        f"messages[{m}].content[{c}]: a {message.role} message holds text only; "
                        "send images and videos in user messages"
                    )
    if messages[-1].role != "user":
        raise InvalidRequest(
            f"messages[{len(messages) - 1}] is a {messages[-1].role} message; the last message must be the user's"
        )


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


@dataclass(frozen=True)
class PlacedMedia:
    """One image or frame after analysis, allocation and encoding."""

    media: Media
    analysis: MediaAnalysis | None  # None: a frame skipped before CLIP (its pixels repeat another's)
    allocated: int  # 0: dropped as a duplicate
    duplicate_of: int | None  # position in the request's media of the frame it repeats
    encoded: EncodedMedia | None  # None when dropped


class Orchestrator:
    """Answers one user turn of text, images and video with compressed visual tokens."""

    def __init__(
        self,
        settings: OrchestratorSettings,
        prompts: PromptBuilder,
        vision: VisionWorkers,
        llm: LLMWorkers,
        metrics: OrchestratorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.prompts = prompts
        self.vision = vision
        self.llm = llm
        self.metrics = metrics or OrchestratorMetrics()
        self.streams = StreamLimiter(settings.limits.max_streams_per_client)

    def _validate(self, request: GenerationRequest) -> Sampling:
        limits = self.settings.limits
        chunks = request.chunks
        if request.messages:
            check_conversation(request.messages)
        elif not chunks:
            raise InvalidRequest("chunks is empty; send at least one text, image or video chunk")
        if len(chunks) > limits.max_chunks:
            field = "the conversation" if request.messages else "chunks"
            raise InvalidRequest(f"{field} has {len(chunks)} parts; the limit is {limits.max_chunks} (max_chunks)")
        images = 0
        text_chars = len(request.system_prompt)
        labels = request.chunk_labels()
        for index, chunk in enumerate(chunks):
            if isinstance(chunk, ImageChunk | VideoChunk) and not chunk.data:
                kind = "image" if isinstance(chunk, ImageChunk) else "video"
                raise InvalidRequest(f"{labels[index]}.{kind}.data is empty")
            if isinstance(chunk, ImageChunk):
                images += 1
                if len(chunk.data) > limits.max_image_bytes:
                    raise InvalidRequest(
                        f"{labels[index]}.image.data is {_mib(len(chunk.data))}; "
                        f"the limit is {_mib(limits.max_image_bytes)} "
                        f"(max_image_bytes={limits.max_image_bytes})"
                    )
            elif isinstance(chunk, TextChunk):
                text_chars += len(chunk.text)
                self.prompts.check_text(chunk.text, f"{labels[index]}.text")
        self.prompts.check_text(request.system_prompt, "system_prompt")
        if images > limits.max_media_items:
            raise InvalidRequest(
                f"the request has {images} images; the limit is {limits.max_media_items} (max_media_items)"
            )
        if text_chars > limits.max_text_chars:
            raise InvalidRequest(
                f"the request has {text_chars} characters of text; "
                f"the limit is {limits.max_text_chars} (max_text_chars)"
            )
        if request.allocation_policy and request.allocation_policy not in POLICIES:
            raise InvalidRequest(f"allocation_policy {request.allocation_policy!r} is not one of {', '.join(POLICIES)}")
        if request.dedup_threshold is not None and not -1.0 <= request.dedup_threshold <= 2.0:
            raise InvalidRequest(f"dedup_threshold is {request.dedup_threshold}; it must be between -1 and 2")
        if request.pixel_dedup_threshold is not None and not 0.0 <= request.pixel_dedup_threshold <= 2.0:
            raise InvalidRequest(
                f"pixel_dedup_threshold is {request.pixel_dedup_threshold}; it must be between 0 and 2 (above 1: off)"
            )
        return self._resolve_sampling(request.sampling)

    def _render(self, request: GenerationRequest, media: list[Media]) -> Prompt:
        """The request's prompt, one placeholder per image and per frame in ``media``: rendered
        once per request, and once more only when frames were dropped as duplicates."""
        return self.prompts.render(
            request.turns, request.system_prompt, self._frame_times(media), self.settings.frame_timestamps
        )

    def _check_text_tokens(self, prompt: Prompt, placeholders: int) -> None:
        """The templated text alone must leave room under ``max_prompt_tokens`` (before any vision work)."""
        limit = self.settings.limits.max_prompt_tokens
        text_tokens = len(prompt.token_ids) - placeholders
        if text_tokens > limit:
            raise InvalidRequest(
                f"the prompt is {text_tokens} tokens of text after the chat template; the limit is {limit} "
                "prompt tokens (max_prompt_tokens)"
            )

    def _resolve_sampling(self, s: Sampling) -> Sampling:
        """Check every sampling field here, so the LLM worker never has to refuse one."""
        limits = self.settings.limits
        vocab = self.prompts.vocab_size
        max_new = s.max_new_tokens or limits.default_max_new_tokens
        if max_new > limits.max_new_tokens:
            raise InvalidRequest(
                f"sampling.max_new_tokens is {max_new}; the limit is {limits.max_new_tokens} (max_new_tokens)"
            )
        # NaN fails every comparison, so each range is written to be false for it.
        if not 0.0 <= s.temperature <= 100.0:
            raise InvalidRequest(f"sampling.temperature is {s.temperature}; it must be between 0 and 100")
        if not 0.0 <= s.top_p <= 1.0:
            raise InvalidRequest(f"sampling.top_p is {s.top_p}; it must be between 0 and 1")
        if not 0 <= s.top_k <= vocab:
            raise InvalidRequest(f"sampling.top_k is {s.top_k}; it must be at most the vocabulary size {vocab}")
        if not 0.0 <= s.repetition_penalty <= 100.0:
            raise InvalidRequest(f"sampling.repetition_penalty is {s.repetition_penalty}; it must be between 0 and 100")
        if len(s.stop_token_ids) > limits.max_stop_token_ids:
            raise InvalidRequest(
                f"sampling.stop_token_ids has {len(s.stop_token_ids)} ids; the limit is {limits.max_stop_token_ids} "
                "(max_stop_token_ids)"
            )
        bad_ids = [i for i in s.stop_token_ids if i >= vocab]
        if bad_ids:
            raise InvalidRequest(
                f"sampling.stop_token_ids holds {bad_ids[0]}, outside the vocabulary of {vocab} tokens"
            )
        if len(s.stop) > limits.max_stop_strings:
            raise InvalidRequest(
                f"sampling.stop has {len(s.stop)} strings; the limit is {limits.max_stop_strings} (max_stop_strings)"
            )
        if "" in s.stop:
            raise InvalidRequest(
                f"sampling.stop[{s.stop.index('')}] is empty; every stop string needs at least one character"
            )
        if any(len(stop) > limits.max_stop_chars for stop in s.stop):
            raise InvalidRequest(
                f"a sampling.stop string is longer than {limits.max_stop_chars} characters (max_stop_chars)"
            )
        return dataclasses.replace(s, max_new_tokens=max_new)

    def _budget(self, request: GenerationRequest, text_tokens: int, max_new_tokens: int) -> int:
        """The visual-token budget: given, or what the context limit leaves; 0 = unlimited."""
        if request.visual_token_budget or not request.context_limit:
            return request.visual_token_budget
        left = request.context_limit - text_tokens - max_new_tokens
        if left < 1:
            raise BudgetExceeded(
                f"context_limit {request.context_limit} leaves no visual tokens: the text takes {text_tokens} "
                f"tokens and sampling.max_new_tokens is {max_new_tokens}"
            )
        return left

    async def _media(self, request: GenerationRequest) -> list[Media]:
        """Every image and sampled video frame of the request, in prompt order (videos are decoded here)."""
        return await asyncio.to_thread(
            expand_media,
            request.chunks,
            self.settings.video,
            self.settings.frames,
            self.settings.limits.max_media_items,
            request.chunk_labels(),
        )

    def _vision_context(self, request: GenerationRequest) -> VisionContext:
        return VisionContext(
            compressor=request.compressor or self.settings.default_compressor,
            params=request.compressor_params,
            question=request.question(),
            request_id=request.request_id,
            deadline=request.deadline,
        )

    async def _visual(
        self, request: GenerationRequest, sampling: Sampling, media: list[Media], prompt: Prompt
    ) -> tuple[list[PlacedMedia], Allocation | None]:
        """Skip repeated frames, analyze, allocate, encode: every image and frame with its tokens.
        ``prompt`` has a placeholder for each of ``media``."""
        if not media:
            return [], None
        context = self._vision_context(request)
        text_tokens = len(prompt.token_ids) - len(media)
        budget = self._budget(request, text_tokens, sampling.max_new_tokens)
        dedup_threshold = self.settings.dedup_threshold if request.dedup_threshold is None else request.dedup_threshold
        pixel_threshold = (
            self.settings.pixel_dedup_threshold
            if request.pixel_dedup_threshold is None
            else request.pixel_dedup_threshold
        )
        # First pass of de-duplication, before any CLIP forward: frames whose pixels repeat the
        # last frame analysed. Off, with the second pass, when dedup_threshold turns it off.
        repeats = repeated_frames(media, pixel_threshold if dedup_threshold <= 1.0 else math.inf)
        analysed = [i for i, repeat in enumerate(repeats) if repeat is None]
        subset = [media[i] for i in analysed]
        if budget:
            # What cannot fit is refused before any CLIP forward: every image, and every frame that
            # de-duplication cannot drop (a video's first; all of them when it is off), at the
            # smallest count the compressor declares for the pack's grid.
            frames = [m for m in subset if m.kind == "video_frame"]
            first_frames = len({m.chunk_index for m in frames})
            must_keep = len(subset) - len(frames) + (first_frames if dedup_threshold <= 1.0 else len(frames))
            refuse_early(must_keep, len(subset) - must_keep, await self.vision.smallest(context), budget)
        keys = [m.content_hash for m in subset]
        analyzed = await self.vision.analyze([ImageToEncode(m.data, m.label) for m in subset], keys, context)
        # Second pass: near-duplicates by their CLIP features, within the allocation.
        allocation = allocate(
            [self._budget_item(subset, analyzed, i) for i in range(len(subset))],
            budget,
            request.allocation_policy or self.settings.allocation_policy,
            dedup_threshold,
            self.settings.budget_floor_share,
        )
        kept = [i for i, item in enumerate(allocation.items) if item.tokens > 0]
        encoded = await self.vision.encode(
            [
                ImageToEncode(subset[i].data, subset[i].label, allocation.items[i].tokens, request.return_coverage)
                for i in kept
            ],
            [keys[i] for i in kept],
            [analyzed[i][1] for i in kept],  # the worker that holds the features
            context,
        )
        by_index = {i: result for i, (result, _worker) in zip(kept, encoded, strict=True)}
        placed: list[PlacedMedia] = []
        position = {index: s for s, index in enumerate(analysed)}  # media index -> subset index
        for i, m in enumerate(media):
            if i in position:
                item = allocation.items[position[i]]
                original = None if item.duplicate_of is None else analysed[item.duplicate_of]
                placed.append(
                    PlacedMedia(m, analyzed[position[i]][0], item.tokens, original, by_index.get(position[i]))
                )
            else:
                # A repeat of a frame that may itself have been dropped after CLIP: name the frame kept.
                repeated = allocation.items[position[repeats[i]]].duplicate_of
                original = repeats[i] if repeated is None else analysed[repeated]
                placed.append(PlacedMedia(m, None, 0, original, None))
        return placed, allocation

    @staticmethod
    def _frame_times(media: list[Media]) -> dict[int, list[float]]:
        """Each video chunk's frames, by their times in seconds."""
        times: dict[int, list[float]] = {}
        for m in media:
            if m.kind == "video_frame":
                times.setdefault(m.chunk_index, []).append(m.timestamp or 0.0)
        return times

    @staticmethod
    def _budget_item(media: list[Media], analyzed: list[tuple[MediaAnalysis, str]], i: int) -> BudgetItem:
        analysis = analyzed[i][0]
        similarity = None
        previous = i - 1
        if media[i].kind == "video_frame" and previous >= 0 and media[previous].chunk_index == media[i].chunk_index:
            similarity = float(np.dot(analysis.descriptor, analyzed[previous][0].descriptor))
        levels = analysis.levels
        if media[i].max_tokens:  # a cap (detail "low"): its largest level within, else its smallest
            levels = tuple(level for level in levels if level <= media[i].max_tokens) or levels[-1:]
        return BudgetItem(
            levels=levels,
            complexity=analysis.complexity,
            video=media[i].chunk_index if media[i].kind == "video_frame" else None,
            similarity_to_previous=similarity,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream the answer as text deltas, then one :class:`Finished` with the usage.

        Counts as one of ``request.client``'s calls in flight until the stream is closed.
        """
        with self.streams.hold(request.client):
            async with contextlib.aclosing(self._generate(request)) as events:
                async for event in events:
                    yield event

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        started = time.perf_counter()
        sampling = self._validate(request)
        media = await self._media(request)
        prompt = self._render(request, media)
        self._check_text_tokens(prompt, len(media))
        placed, allocation = await self._visual(request, sampling, media, prompt)
        kept = [p for p in placed if p.encoded is not None]
        encode_ms = (time.perf_counter() - started) * 1000.0
        if len(kept) < len(placed):  # frames dropped as duplicates leave the prompt
            prompt = self._render(request, [p.media for p in kept])
        input_ids, starts = self.prompts.expand(prompt, [p.encoded.tokens_after for p in kept], sampling.max_new_tokens)
        limit = self.settings.limits.max_prompt_tokens
        if len(input_ids) > limit:
            visual_rows = sum(p.encoded.tokens_after for p in kept)
            raise BudgetExceeded(
                f"the prompt is {len(input_ids)} tokens ({visual_rows} visual) after the chat template; the limit is "
                f"{limit} prompt tokens (max_prompt_tokens); lower visual_token_budget or use a stronger compressor"
            )
        # Images whose compressor asked for pooling inside the LLM (staged pooling at layer K).
        spans = tuple(
            ImageSpan.placed(p.encoded.directive, start, p.encoded.tokens_after)
            for start, p in zip(starts, kept, strict=True)
            if p.encoded.directive is not None
        )
        visual = np.concatenate([p.encoded.tokens.materialize() for p in kept]) if kept else None
        logger.info(
            "request %s: %d prompt tokens, %d visual from %d of %d images and frames (%s)",
            request.request_id,
            len(input_ids),
            0 if visual is None else visual.shape[0],
            len(kept),
            len(placed),
            "no budget"
            if allocation is None or not allocation.budget
            else f"budget {allocation.budget}, {allocation.policy}",
        )

        detokenizer = IncrementalDetokenizer(self.prompts.tokenizer, sampling.stop)
        completion: list[int] = []
        first_token_at: float | None = None
        finish_reason = ""
        llm_request = LLMRequest(input_ids, visual, sampling, request.request_id, spans, request.deadline)
        # aclosing: leaving the loop early (a stop string, a client gone) cancels the Triton request now.
        async with contextlib.aclosing(self.llm.generate(llm_request)) as steps:
            async for step in steps:
                if step.token_ids:
                    first_token_at = first_token_at or time.perf_counter()
                    completion.extend(step.token_ids)
                    yield TextDelta(detokenizer.push(step.token_ids), step.token_ids)
                if detokenizer.stopped:
                    finish_reason = "stop"
                    break
                if step.finish_reason:
                    finish_reason = step.finish_reason
                    break
        tail = detokenizer.flush()
        if tail:
            yield TextDelta(tail, ())
        finished_at = time.perf_counter()
        usage = Usage(
            prompt_tokens=len(input_ids),
            completion_tokens=len(completion),
            visual_tokens=0 if visual is None else int(visual.shape[0]),
            visual_token_budget=allocation.budget if allocation is not None else request.visual_token_budget,
            media=tuple(self._media_usage(p) for p in placed),
            allocation_policy=allocation.policy if allocation is not None else "",
            frames=self._frame_counts(placed),
            timings=Timings(
                encode_ms=encode_ms,
                time_to_first_token_ms=((first_token_at or finished_at) - started) * 1000.0,
                total_ms=(finished_at - started) * 1000.0,
            ),
        )
        self.metrics.record(finish_reason, usage)
        yield Finished(finish_reason=finish_reason, usage=usage)

    @staticmethod
    def _frame_counts(placed: list[PlacedMedia]) -> FrameCounts:
        frames = [p for p in placed if p.media.kind == "video_frame"]
        return FrameCounts(
            sampled=len(frames),
            analysed=sum(p.analysis is not None for p in frames),
            kept=sum(p.encoded is not None for p in frames),
        )

    @staticmethod
    def _media_usage(p: PlacedMedia) -> MediaUsage:
        e, a = p.encoded, p.analysis
        if a is None:
            return MediaUsage(
                chunk_index=p.media.chunk_index,
                kind=p.media.kind,
                tokens_before=0,
                tokens_after=0,
                compressor="",
                cache_hit=False,
                cache_key="",
                encode_ms=0.0,
                worker="",
                duplicate_of=p.duplicate_of,
                timestamp=p.media.timestamp,
                skipped_before_clip=True,
            )
        return MediaUsage(
            chunk_index=p.media.chunk_index,
            kind=p.media.kind,
            tokens_before=a.tokens_before,
            tokens_after=e.tokens_after if e else 0,
            compressor=e.compressor if e else "",
            # A hit means nothing was computed for this item in this request: its features were
            # kept from before (Analyze spared CLIP) and its tokens came from the cache.
            cache_hit=bool(e and e.cache_hit and a.features_cached),
            cache_key=e.cache_key if e else "",
            encode_ms=e.encode_ms if e else 0.0,
            worker=e.worker if e else a.worker,
            grid=a.grid,
            complexity=a.complexity,
            coverage=e.coverage if e else (),
            allocated_tokens=p.allocated,
            duplicate_of=p.duplicate_of,
            timestamp=p.media.timestamp,
            features_cached=a.features_cached,
        )
