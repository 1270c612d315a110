"""Small helpers for clients of the public API (used by `squint ask` and the tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from squint.generate.v1 import generate_pb2 as pb
from squint.wire import compressor_spec


def build_request(
    question: str,
    images: Sequence[bytes] = (),
    compressor: str = "",
    params: dict[str, Any] | None = None,
    budget: int = 0,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    seed: int = 0,
    images_first: bool = True,
) -> pb.GenerateRequest:
    """A request with the images (before the question, as LLaVA-1.5 prompts) and the question."""
    image_chunks = [pb.Chunk(image=pb.Image(data=data)) for data in images]
    text_chunks = [pb.Chunk(text=question)] if question else []
    return pb.GenerateRequest(
        chunks=image_chunks + text_chunks if images_first else text_chunks + image_chunks,
        visual_token_budget=budget,
        compressor=compressor_spec(compressor, params),
        sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
    )


def usage_lines(reply: pb.GenerateResponse) -> list[str]:
    """Human-readable usage, one line per fact."""
    usage = reply.usage
    lines = []
    for media in usage.media:
        cache = "cache hit" if media.cache_hit else "cache miss"
        lines.append(
            f"visual tokens {media.tokens_before} -> {media.tokens_after} ({media.compressor}) "
            f"for chunk {media.chunk_index}, {cache}, encode {media.encode_ms:.0f} ms"
        )
    budget = f" of budget {usage.visual_token_budget}" if usage.visual_token_budget else ""
    lines.append(
        f"prompt {usage.prompt_tokens} tokens ({usage.visual_tokens} visual{budget}), "
        f"completion {usage.completion_tokens} tokens, finish {reply.finish_reason}"
    )
    t = usage.timings
    lines.append(
        f"encode {t.encode_ms:.0f} ms, time to first token {t.time_to_first_token_ms:.0f} ms, total {t.total_ms:.0f} ms"
    )
    return lines
