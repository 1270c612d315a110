"""The orchestrator's transport-free core: validate, encode images, template, generate, stream."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import numpy as np

from orchestrator.detokenize import IncrementalDetokenizer
from orchestrator.llm_client import LLMRequest, TritonLLMClient
from orchestrator.prompting import PromptBuilder
from orchestrator.settings import OrchestratorSettings
from orchestrator.types import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    ImageChunk,
    MediaUsage,
    Sampling,
    TextChunk,
    TextDelta,
    Timings,
    Usage,
    VideoChunk,
)
from orchestrator.vision_client import EncodedMedia, ImageToEncode, VisionClient
from squint.errors import BudgetExceeded, InvalidRequest, Unsupported

logger = logging.getLogger(__name__)


class Orchestrator:
    """Answers one user turn of text and images with compressed visual tokens."""

    def __init__(
        self,
        settings: OrchestratorSettings,
        prompts: PromptBuilder,
        vision: VisionClient,
        llm: TritonLLMClient,
    ) -> None:
        self.settings = settings
        self.prompts = prompts
        self.vision = vision
        self.llm = llm

    def _validate(self, request: GenerationRequest) -> Sampling:
        limits = self.settings.limits
        chunks = request.chunks
        if not chunks:
            raise InvalidRequest("chunks is empty; send at least one text or image chunk")
        if len(chunks) > limits.max_chunks:
            raise InvalidRequest(f"chunks has {len(chunks)} entries; the limit is {limits.max_chunks} (max_chunks)")
        images = 0
        text_chars = len(request.system_prompt)
        for index, chunk in enumerate(chunks):
            if isinstance(chunk, VideoChunk):
                raise Unsupported(f"chunks[{index}].video: video input is not supported by this server yet")
            if isinstance(chunk, ImageChunk):
                images += 1
                if not chunk.data:
                    raise InvalidRequest(f"chunks[{index}].image.data is empty")
            elif isinstance(chunk, TextChunk):
                text_chars += len(chunk.text)
                self.prompts.check_text(chunk.text, f"chunks[{index}].text")
        self.prompts.check_text(request.system_prompt, "system_prompt")
        if images > limits.max_media_items:
            raise InvalidRequest(f"the request has {images} images; the limit is {limits.max_media_items} (max_media_items)")
        if text_chars > limits.max_text_chars:
            raise InvalidRequest(
                f"the request has {text_chars} characters of text; the limit is {limits.max_text_chars} (max_text_chars)"
            )
        if images and request.visual_token_budget and request.visual_token_budget < images:
            raise BudgetExceeded(
                f"visual_token_budget {request.visual_token_budget} is less than one token for each of the {images} images"
            )
        return self._resolve_sampling(request.sampling)

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
        bad_ids = [i for i in s.stop_token_ids if i >= vocab]
        if bad_ids:
            raise InvalidRequest(f"sampling.stop_token_ids holds {bad_ids[0]}, outside the vocabulary of {vocab} tokens")
        if len(s.stop) > limits.max_stop_strings:
            raise InvalidRequest(
                f"sampling.stop has {len(s.stop)} strings; the limit is {limits.max_stop_strings} (max_stop_strings)"
            )
        if any(len(stop) > limits.max_stop_chars for stop in s.stop):
            raise InvalidRequest(
                f"a sampling.stop string is longer than {limits.max_stop_chars} characters (max_stop_chars)"
            )
        return dataclasses.replace(s, max_new_tokens=max_new)

    async def _encode(self, request: GenerationRequest) -> list[tuple[int, EncodedMedia]]:
        images = [(index, chunk) for index, chunk in enumerate(request.chunks) if isinstance(chunk, ImageChunk)]
        if not images:
            return []
        # Until budget allocation lands, a budget is split evenly as a per-image cap.
        cap = request.visual_token_budget // len(images) if request.visual_token_budget else 0
        question = " ".join(c.text for c in request.chunks if isinstance(c, TextChunk))
        encoded = await self.vision.encode(
            [ImageToEncode(chunk.data, f"chunks[{index}].image", cap, request.return_coverage) for index, chunk in images],
            request.compressor or self.settings.default_compressor,
            request.compressor_params,
            question,
            request.request_id,
        )
        for (index, _), media in zip(images, encoded, strict=True):
            if media.directive is not None:
                raise Unsupported(
                    f"chunks[{index}].image: compressor {media.compressor!r} asks to pool inside the LLM at layer "
                    f"{media.directive[0]}; this LLM worker does not do in-LLM pooling yet (use layer -1)"
                )
        return [(index, media) for (index, _), media in zip(images, encoded, strict=True)]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream the answer as text deltas, then one :class:`Finished` with the usage."""
        started = time.perf_counter()
        sampling = self._validate(request)
        prompt = self.prompts.render(request.chunks, request.system_prompt)
        encoded = await self._encode(request)
        encode_ms = (time.perf_counter() - started) * 1000.0
        input_ids = self.prompts.expand(prompt, [m.tokens_after for _, m in encoded], sampling.max_new_tokens)
        visual = np.concatenate([m.tokens.materialize() for _, m in encoded]) if encoded else None
        logger.info(
            "request %s: %d prompt tokens, %d visual in %d images",
            request.request_id,
            len(input_ids),
            0 if visual is None else visual.shape[0],
            len(encoded),
        )

        detokenizer = IncrementalDetokenizer(self.prompts.tokenizer, sampling.stop)
        completion: list[int] = []
        first_token_at: float | None = None
        finish_reason = ""
        llm_request = LLMRequest(input_ids, visual, sampling, request.request_id)
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
        yield Finished(
            finish_reason=finish_reason,
            usage=Usage(
                prompt_tokens=len(input_ids),
                completion_tokens=len(completion),
                visual_tokens=0 if visual is None else int(visual.shape[0]),
                visual_token_budget=request.visual_token_budget,
                media=tuple(
                    MediaUsage(
                        chunk_index=index,
                        kind="image",
                        tokens_before=m.tokens_before,
                        tokens_after=m.tokens_after,
                        compressor=m.compressor,
                        cache_hit=m.cache_hit,
                        cache_key=m.cache_key,
                        encode_ms=m.encode_ms,
                        worker=m.worker,
                        grid=m.grid,
                        complexity=m.complexity,
                        coverage=m.coverage,
                    )
                    for index, m in encoded
                ),
                timings=Timings(
                    encode_ms=encode_ms,
                    time_to_first_token_ms=((first_token_at or finished_at) - started) * 1000.0,
                    total_ms=(finished_at - started) * 1000.0,
                ),
            ),
        )
