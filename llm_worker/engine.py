"""The generation engine: LLaVA's language model fed with visual tokens made elsewhere.

The vision worker owns the vision tower and the projector; this engine loads only what turns
embeddings into text (token embeddings, decoder, LM head) and the tokenizer (for stop strings).
A request carries the prompt's token ids, where each image's placeholder
(``image_token_index``) is repeated once per visual token, and the images' tokens in LLM space,
concatenated in prompt order. The engine writes those rows over the placeholders' embeddings,
prefills, then decodes one token at a time with a KV cache, yielding each token as it comes.

Greedy output equals ``LlavaForConditionalGeneration.generate(do_sample=False)`` token for
token when the visual tokens are that model's ``get_image_features(...).pooler_output``; the
same operations run in the same order. Sampling uses Hugging Face's own logits processors so
``temperature``, ``top_k``, ``top_p`` and ``repetition_penalty`` mean what they mean there.

Nothing here knows about Triton.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoTokenizer,
    DynamicCache,
    LlavaForConditionalGeneration,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from squint.errors import InvalidRequest

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
DType = Literal["auto", "float32", "float16"]

_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
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
    placeholders; ``None`` (or zero rows) for a text-only prompt.
    """

    input_ids: torch.Tensor
    visual_embeds: torch.Tensor | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)


@dataclass(frozen=True)
class GenerationStep:
    """One generated token; ``finish_reason`` is set on the last step only."""

    token_id: int
    finish_reason: FinishReason | None = None


class LLMEngine:
    """The language half of a LLaVA checkpoint, ready to continue prompts with visual tokens.

    One engine serves one request at a time: ``generate`` is not safe to interleave across
    threads (the caller serialises requests).
    """

    def __init__(
        self,
        language_model: torch.nn.Module,
        lm_head: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        image_token_index: int,
        eos_token_ids: tuple[int, ...],
        max_context: int,
    ) -> None:
        self._language_model = language_model
        self._embed_tokens: torch.nn.Module = language_model.get_input_embeddings()
        self._lm_head = lm_head
        self._tokenizer = tokenizer
        self.image_token_index = image_token_index
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        weight = self._embed_tokens.weight
        self.vocab_size: int = weight.shape[0]
        self.hidden_size: int = weight.shape[1]
        self.device: torch.device = weight.device
        self.dtype: torch.dtype = weight.dtype

    @classmethod
    def load(cls, llava_dir: Path | str, *, device: str | torch.device = "cpu", dtype: DType = "auto") -> LLMEngine:
        """Load the language model, LM head and tokenizer of a LLaVA checkpoint folder.

        ``dtype="auto"`` keeps the checkpoint's dtype. The vision tower and projector are
        dropped after loading: the vision worker owns them.
        """
        llava_dir = Path(llava_dir)
        if not (llava_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"LLM engine: {llava_dir} has no config.json; point it at a LLaVA checkpoint folder "
                "(a model pack's llava folder)"
            )
        if dtype != "auto" and dtype not in _TORCH_DTYPES:
            raise ValueError(f"LLM engine: dtype {dtype!r} is not one of auto, {', '.join(_TORCH_DTYPES)}")
        device = torch.device(device)
        logger.info("loading the language model of %s (dtype %s) onto %s", llava_dir, dtype, device)
        model = LlavaForConditionalGeneration.from_pretrained(
            llava_dir, dtype="auto" if dtype == "auto" else _TORCH_DTYPES[dtype]
        )
        config = model.config
        # Keep the decoder and head; the rest of ``model`` (vision tower, projector) goes with it.
        language_model = model.model.language_model.to(device).eval()
        lm_head = model.lm_head.to(device).eval()
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = config.text_config.eos_token_id
        eos_token_ids = tuple(int(i) for i in (eos if isinstance(eos, list | tuple) else [eos]) if i is not None)
        del model
        tokenizer = AutoTokenizer.from_pretrained(llava_dir)
        engine = cls(
            language_model,
            lm_head,
            tokenizer,
            image_token_index=int(config.image_token_index),
            eos_token_ids=eos_token_ids,
            max_context=int(config.text_config.max_position_embeddings),
        )
        logger.info(
            "language model ready: hidden %d, vocab %d, %s on %s, eos %s, image token %d",
            engine.hidden_size,
            engine.vocab_size,
            engine.dtype,
            engine.device,
            list(eos_token_ids),
            engine.image_token_index,
        )
        return engine

    def generate(
        self, request: GenerationRequest, is_cancelled: Callable[[], bool] | None = None
    ) -> Iterator[GenerationStep]:
        """Check ``request`` now (raising :class:`InvalidRequest`), then return its token stream.

        The stream yields one :class:`GenerationStep` per new token, the last one with its
        finish reason. It ends early, without a finish reason, once ``is_cancelled()`` is true
        (checked before every forward pass).
        """
        input_ids, visual_embeds = self._check(request)
        return self._decode(input_ids, visual_embeds, request.sampling, is_cancelled or _never)

    def _check(self, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
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

        n_placeholders = int((ids == self.image_token_index).sum())
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
        return ids, (visual if n_placeholders else None)

    def _decode(
        self,
        input_ids: torch.Tensor,
        visual_embeds: torch.Tensor | None,
        options: SamplingOptions,
        is_cancelled: Callable[[], bool],
    ) -> Iterator[GenerationStep]:
        if is_cancelled():
            return
        processors = _logits_processors(options)
        generator = torch.Generator(device=self.device)
        if options.seed is None:
            generator.seed()
        else:
            generator.manual_seed(options.seed)
        stop_ids = frozenset(self.eos_token_ids) | frozenset(options.stop_token_ids)

        ids = input_ids.to(self.device)[None]  # [1, n_prompt]: prompt + generated, for the penalty
        with torch.inference_mode():
            embeds = self._embed_tokens(ids)  # [1, n_prompt, hidden]
            if visual_embeds is not None:
                # Boolean-mask assignment fills placeholder rows in order, as HF's masked_scatter does.
                embeds[0, ids[0] == self.image_token_index] = visual_embeds.to(self.device, self.dtype)
            cache = DynamicCache(config=self._language_model.config)
            attention_mask = torch.ones_like(ids)  # [1, n_seen]
            logits = self._forward(embeds, attention_mask, cache)  # [1, vocab]

        generated: list[int] = []
        for step in range(options.max_new_tokens):
            with torch.inference_mode():
                scores = processors(ids, logits)  # [1, vocab]
                if options.greedy:
                    next_id = torch.argmax(scores, dim=-1)  # [1]
                else:
                    probs = torch.softmax(scores, dim=-1)
                    next_id = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # [1]
            token_id = int(next_id)
            generated.append(token_id)
            reason: FinishReason | None = None
            if token_id in stop_ids or self._hits_stop_string(generated, options.stop):
                reason = "stop"
            elif step + 1 == options.max_new_tokens:
                reason = "length"
            yield GenerationStep(token_id, reason)
            if reason is not None or is_cancelled():
                return
            with torch.inference_mode():
                ids = torch.cat([ids, next_id[:, None]], dim=-1)
                attention_mask = torch.ones_like(ids)
                logits = self._forward(self._embed_tokens(next_id[:, None]), attention_mask, cache)

    def _forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Run ``embeds`` [1, n_new, hidden] through the decoder; the last position's logits [1, vocab], float32."""
        out = self._language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=cache, use_cache=True
        )
        # The head sees only the last position, as generate's logits_to_keep=1 does.
        return self._lm_head(out.last_hidden_state[:, -1:, :])[:, -1].float()

    def _hits_stop_string(self, generated: list[int], stop: tuple[str, ...]) -> bool:
        if not stop:
            return False
        text = self._tokenizer.decode(generated, skip_special_tokens=True)
        return any(s in text for s in stop)


def _never() -> bool:
    return False


def _logits_processors(options: SamplingOptions) -> LogitsProcessorList:
    """Hugging Face's processors in ``generate``'s order: penalty, then temperature, top-k, top-p."""
    processors = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if not options.greedy:
        if options.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(options.temperature))
        if options.top_k:
            processors.append(TopKLogitsWarper(top_k=options.top_k))
        if options.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=options.top_p))
    return processors


__all__ = [
    "DType",
    "FinishReason",
    "GenerationRequest",
    "GenerationStep",
    "LLMEngine",
    "SamplingOptions",
]
