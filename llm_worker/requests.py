"""What a generation request is, and the checks every engine makes before running one.

Both engines (the staged engine, :mod:`llm_worker.engine`, and vLLM, :mod:`llm_worker.vllm_engine`)
take the same :class:`GenerationRequest`, check it with :class:`PromptChecks` and build the
prompt's embeddings with :func:`prompt_embeddings`: the token ids embedded with the language
model's own table, each image placeholder's row replaced by its visual token, in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from llm_worker import STAGED_MODEL_NAME
from llm_worker.spans import ImageSpan
from squint.errors import InvalidRequest

FinishReason = Literal["stop", "length"]

# Largest seed torch.Generator.manual_seed accepts (it takes the value as a uint64).
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are chosen and when generation stops.

    ``temperature == 0`` is greedy decoding; ``top_k``, ``top_p`` and ``seed`` then have no
    effect. ``top_k == 0`` and ``top_p == 1`` disable those filters. ``repetition_penalty``
    follows Hugging Face: over the prompt and the generated ids, a positive logit is divided
    by it and a negative one multiplied. ``seed`` makes sampling reproducible (``None``: a
    fresh random seed per request). Generation stops at the model's end-of-sequence ids, at
    any of ``stop_token_ids`` and when the decoded output contains any of ``stop``; the
    token that triggers a stop is still yielded.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens is {self.max_new_tokens}; it must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequest(f"temperature is {self.temperature}; it must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k is {self.top_k}; it must be >= 0 (0 = no top-k filter)")
        if not (0 < self.top_p <= 1):
            raise InvalidRequest(f"top_p is {self.top_p}; it must be in (0, 1] (1 = no nucleus filter)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequest(f"repetition_penalty is {self.repetition_penalty}; it must be > 0 (1 = none)")
        if self.seed is not None and not (0 <= self.seed <= _MAX_SEED):
            raise InvalidRequest(f"seed is {self.seed}; it must be in [0, 2**64 - 1]")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("stop holds an empty string; every stop string needs at least one character")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue.

    ``input_ids``: ``[n_prompt]`` int64, with the image placeholder id repeated once per visual
    token. ``visual_embeds``: ``[n_visual, llm_hidden]`` (any float dtype; cast to the model's),
    the images' tokens concatenated in prompt order, ``n_visual`` equal to the number of
    placeholders; ``None`` (or zero rows) for a text-only prompt. ``image_spans``: the spans
    of placeholders to pool inside the LLM, each with its own layer, stride, shape and
    reference mode (none: no in-LLM pooling).
    """

    input_ids: torch.Tensor
    visual_embeds: torch.Tensor | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    image_spans: tuple[ImageSpan, ...] = ()


@dataclass(frozen=True)
class PreparedRequest:
    """A request the engine has checked: ``input_ids`` [n_prompt] int64 on the CPU, ``visual_embeds``
    [n_visual, hidden] or ``None``, ``image_spans`` sorted by start."""

    input_ids: torch.Tensor
    visual_embeds: torch.Tensor | None
    sampling: SamplingOptions
    image_spans: tuple[ImageSpan, ...]

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def visual_tokens(self) -> int:
        """Visual tokens after every compression: spliced rows, in-LLM pooled spans at their pooled length."""
        spliced = 0 if self.visual_embeds is None else int(self.visual_embeds.shape[0])
        return spliced - sum(span.length - span.pooled_length for span in self.image_spans)


@dataclass(frozen=True)
class GenerationStep:
    """One generated token; ``finish_reason`` is set on the last step only."""

    token_id: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class PromptChecks:
    """The facts about a language model a request is checked against.

    ``n_layers`` is 0 for an engine without in-LLM pooling (vLLM): image spans are then refused.
    """

    vocab_size: int
    hidden_size: int
    image_token_index: int
    max_context: int
    n_layers: int
    has_tokenizer: bool

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check ``request`` against this model; raise :class:`InvalidRequest` naming what is wrong."""
        ids = request.input_ids
        if ids.ndim != 1 or ids.numel() == 0:
            raise InvalidRequest(f"input_ids must be a non-empty 1-D tensor of token ids, got shape {list(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidRequest(f"input_ids must hold integer token ids, got {ids.dtype}")
        ids = ids.to(torch.long)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise InvalidRequest(
                f"input_ids holds token id {bad}, outside this model's vocabulary [0, {self.vocab_size})"
            )
        n_prompt = ids.numel()
        max_new_tokens = request.sampling.max_new_tokens
        if n_prompt + max_new_tokens > self.max_context:
            raise InvalidRequest(
                f"the prompt has {n_prompt} tokens and max_new_tokens is {max_new_tokens}, "
                f"{n_prompt + max_new_tokens} in all, above this model's context of {self.max_context}; "
                f"lower max_new_tokens to {max(self.max_context - n_prompt, 0)} or shorten the prompt"
            )
        for token_id in request.sampling.stop_token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequest(f"stop_token_ids holds {token_id}, outside the vocabulary [0, {self.vocab_size})")
        if request.sampling.stop and not self.has_tokenizer:
            raise InvalidRequest("stop strings need a tokenizer and this engine was built without one")

        placeholders = ids == self.image_token_index
        n_placeholders = int(placeholders.sum())
        visual = request.visual_embeds
        n_visual = 0
        if visual is not None and visual.numel() > 0:
            if visual.ndim != 2 or visual.shape[1] != self.hidden_size:
                raise InvalidRequest(
                    f"visual_embeds has shape {list(visual.shape)}; expected [n_visual_tokens, {self.hidden_size}] "
                    "(the LLM's hidden size): project the images' tokens with this pack's projector"
                )
            if not visual.is_floating_point():
                raise InvalidRequest(f"visual_embeds must be floating point, got {visual.dtype}")
            n_visual = int(visual.shape[0])
        if n_visual != n_placeholders:
            raise InvalidRequest(
                f"visual_embeds has {n_visual} rows but input_ids holds {n_placeholders} image placeholder "
                f"tokens (id {self.image_token_index}); repeat each image's placeholder once per visual token"
            )
        spans = self._check_spans(request.image_spans, placeholders)
        return PreparedRequest(
            input_ids=ids,
            visual_embeds=visual if n_placeholders else None,
            sampling=request.sampling,
            image_spans=spans,
        )

    def _check_spans(self, spans: tuple[ImageSpan, ...], placeholders: torch.Tensor) -> tuple[ImageSpan, ...]:
        """``spans`` sorted by start, once each is inside the prompt, over placeholders only,
        poolable and apart from the others. ``placeholders``: [n_prompt] bool."""
        n_prompt = placeholders.numel()
        if spans and self.n_layers == 0:
            raise InvalidRequest(
                "this engine does not pool inside the LLM (image_spans); the staged engine "
                f"({STAGED_MODEL_NAME}) serves in-LLM pooling and reference_mode"
            )
        for row, span in enumerate(spans):
            where = f"image_spans row {row} (start {span.start}, length {span.length})"
            if span.start < 0 or span.length < 1 or span.end > n_prompt:
                raise InvalidRequest(f"{where} does not lie inside the prompt's {n_prompt} tokens")
            if not 0 <= span.layer < self.n_layers:
                raise InvalidRequest(
                    f"{where}: layer {span.layer} is not a decoder layer of this model (0..{self.n_layers - 1}); "
                    "pooling before the LLM (layer -1) is the vision worker's, not a span"
                )
            if span.shape not in ("1d", "2d"):
                raise InvalidRequest(f"{where}: shape {span.shape!r} is neither 1d nor 2d")
            limit = span.side if span.shape == "2d" else span.length
            if span.shape == "2d" and span.side * span.side != span.length:
                raise InvalidRequest(f"{where}: 2d pooling needs a square grid, and {span.length} is not a square")
            if not 1 <= span.stride <= limit:
                raise InvalidRequest(
                    f"{where}: stride {span.stride} must be in 1..{limit} "
                    f"(the span's {'grid side' if span.shape == '2d' else 'length'})"
                )
            inside = placeholders[span.start : span.end]
            if not bool(inside.all()):
                bad = span.start + int((~inside).nonzero()[0])
                raise InvalidRequest(
                    f"{where} covers prompt token {bad}, which is not an image placeholder "
                    f"(id {self.image_token_index}); a span covers one image's visual tokens only"
                )
        ordered = sorted(range(len(spans)), key=lambda row: spans[row].start)
        for before, after in zip(ordered, ordered[1:]):
            if spans[after].start < spans[before].end:
                raise InvalidRequest(
                    f"image_spans rows {before} and {after} overlap: tokens [{spans[before].start}, "
                    f"{spans[before].end}) and [{spans[after].start}, {spans[after].end})"
                )
        return tuple(spans[row] for row in ordered)


def prompt_embeddings(
    embed_tokens: torch.nn.Module, input_ids: torch.Tensor, visual_embeds: torch.Tensor | None, image_token_index: int
) -> torch.Tensor:
    """The prompt as the language model's input embeddings, ``[1, n_prompt, hidden]``.

    ``input_ids`` [n_prompt] on the table's device; ``visual_embeds`` [n_placeholders, hidden] or
    ``None``. Boolean-mask assignment fills the placeholder rows in order, as Hugging Face's
    ``masked_scatter`` in ``LlavaModel`` does, so both engines see the prompt HF's model sees.
    """
    embeds = embed_tokens(input_ids[None])  # [1, n_prompt, hidden]
    if visual_embeds is not None:
        embeds[0, input_ids == image_token_index] = visual_embeds.to(embeds.device, embeds.dtype)
    return embeds


__all__ = [
    "FinishReason",
    "GenerationRequest",
    "GenerationStep",
    "PreparedRequest",
    "PromptChecks",
    "SamplingOptions",
    "prompt_embeddings",
]
