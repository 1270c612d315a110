"""The generation engine: LLaVA's language model fed with visual tokens made elsewhere.

The vision worker owns the vision tower and the projector; this engine loads only what turns
embeddings into text (token embeddings, decoder, LM head) and the tokenizer (for stop strings).
A request carries the prompt's token ids, where each image's placeholder
(``image_token_index``) is repeated once per visual token, the images' tokens in LLM space,
concatenated in prompt order, and optionally image spans to pool inside the LLM
(LLaVolta, docs/methods.md §2). The engine writes the visual rows over the placeholders'
embeddings, prefills one sequence at a time, and decodes any number of sequences together,
one token each per step (:mod:`llm_worker.staged` runs the layers).

A sequence's tokens do not depend on what it is decoded beside: ``step([a, b, ...])`` gives
``a`` the logits ``step([a])`` would, bit for bit. Without image spans, greedy output equals
``LlavaForConditionalGeneration.generate(do_sample=False)`` token for token when the visual
tokens are that model's ``get_image_features(...).pooler_output``: the prefill runs the same
operations in the same order, and decode steps differ from it only in the last bits of
rounding (tiled matmuls). Sampling uses Hugging Face's own logits processors so
``temperature``, ``top_k``, ``top_p`` and ``repetition_penalty`` mean what they mean there.

Nothing here knows about Triton.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
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

from llm_worker.requests import (
    FinishReason,
    GenerationRequest,
    GenerationStep,
    PreparedRequest,
    PromptChecks,
    SamplingOptions,
    prompt_embeddings,
)
from llm_worker.spans import ImageSpan
from llm_worker.staged import DECODE_TILE, StagedDecoder, cache_bytes, cache_lengths

logger = logging.getLogger(__name__)

DType = Literal["auto", "float32", "float16"]

_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


class StopStrings:
    """Whether the decoded output contains a stop string, decoding only a bounded window per token.

    Incremental detokenisation (as vLLM's): each new token is decoded together with the few
    tokens before it, and only the text it adds is appended to the last ``max(len(stop)) - 1``
    characters already seen; a token that ends inside a multi-byte character adds text once
    the character is whole (so a broken byte sequence's U+FFFD is matched once text follows
    it). The work per token does not grow with the output's length.
    """

    # Tokens that produced no text yet (parts of one character, skipped special tokens) kept
    # before giving up their context: a character has at most 4 bytes.
    _MAX_PENDING = 8

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._keep = max(len(s) for s in stop) - 1
        self._tokens: list[int] = []  # from the prefix offset on
        self._read = 0  # tokens[:read] have produced their text
        self._tail = ""

    def add(self, token_id: int) -> bool:
        """Take the next generated token; ``True`` once the output contains a stop string."""
        self._tokens.append(token_id)
        before = self._decode(self._tokens[: self._read])
        text = self._decode(self._tokens)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            # Nothing printable yet (a partial character, or a skipped special token).
            if len(self._tokens) - self._read > self._MAX_PENDING:
                self._tokens, self._read = self._tokens[-self._MAX_PENDING :], 0
            return False
        window = self._tail + text[len(before) :]
        # The tokens that produced text so far become the next token's context.
        self._tokens = self._tokens[self._read :]
        self._read = len(self._tokens)
        self._tail = window[len(window) - self._keep :] if self._keep else ""
        return any(s in window for s in self._stop)

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""


class GenerationSequence:
    """One prompt being continued: its cache, the position of its next token, its sampling state.

    Made by :meth:`LLMEngine.start` (the prefill); :meth:`choose` picks a token from the
    current logits, :meth:`LLMEngine.step` feeds it and computes the next logits.
    """

    def __init__(
        self,
        prepared: PreparedRequest,
        cache: DynamicCache,
        logits: torch.Tensor,
        *,
        n_layers: int,
        stop_ids: frozenset[int],
        stop_strings: StopStrings | None,
    ) -> None:
        options = prepared.sampling
        self.options = options
        self.cache = cache
        self.logits = logits  # [1, vocab] float32: scores of the next token
        # Decoding continues from the unpooled length, in-LLM pooling or not (docs/methods.md §2.5).
        self.position = prepared.prompt_tokens
        self.prompt_tokens = prepared.prompt_tokens
        self.n_generated = 0
        self.last_token: int | None = None
        self.finish_reason: FinishReason | None = None
        self._n_layers = n_layers
        self._stop_ids = stop_ids
        self._stop_strings = stop_strings
        self._processors = _logits_processors(options)
        self._generator = torch.Generator(device=logits.device)
        if options.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(options.seed)
        # Prompt and generated ids, for the repetition penalty: [1, n_prompt + n_generated].
        self._ids = prepared.input_ids.to(logits.device)[None]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def choose(self) -> GenerationStep:
        """Pick the next token from the current logits and decide whether it is the last."""
        if self.finished:
            raise RuntimeError("this sequence has finished; it chooses no more tokens")
        with torch.inference_mode():
            scores = self._processors(self._ids, self.logits)  # [1, vocab]
            if self.options.greedy:
                next_id = torch.argmax(scores, dim=-1)  # [1]
            else:
                probs = torch.softmax(scores, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=self._generator).squeeze(1)  # [1]
            if self.options.repetition_penalty != 1.0:
                self._ids = torch.cat([self._ids, next_id[:, None]], dim=-1)
        token_id = int(next_id)
        self.last_token = token_id
        self.n_generated += 1
        hit_stop_string = self._stop_strings is not None and self._stop_strings.add(token_id)
        if token_id in self._stop_ids or hit_stop_string:
            self.finish_reason = "stop"
        elif self.n_generated == self.options.max_new_tokens:
            self.finish_reason = "length"
        return GenerationStep(token_id, self.finish_reason)

    def cache_lengths(self) -> tuple[int, ...]:
        """Tokens cached per decoder layer (full below an in-LLM pooling layer, pooled from it)."""
        return cache_lengths(self.cache, self._n_layers)

    def kv_bytes(self) -> int:
        return cache_bytes(self.cache)

    def release(self) -> None:
        """Drop the cache now (the sequence left the batch)."""
        self.cache = DynamicCache()


class LLMEngine:
    """The language half of a LLaVA checkpoint, ready to continue prompts with visual tokens.

    :meth:`prepare` checks a request and is safe from any thread; :meth:`start`,
    :meth:`step` and :meth:`generate` run the model and must be called from one thread at a
    time (the serving loop owns them).
    """

    def __init__(
        self,
        language_model: torch.nn.Module,
        lm_head: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        image_token_index: int,
        eos_token_ids: tuple[int, ...],
        max_context: int,
        decode_tile: int = DECODE_TILE,
    ) -> None:
        self._language_model = language_model
        self._embed_tokens: torch.nn.Module = language_model.get_input_embeddings()
        self._lm_head = lm_head
        self._tokenizer = tokenizer
        self.decoder = StagedDecoder(language_model, lm_head, decode_tile=decode_tile)
        self.image_token_index = image_token_index
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        weight = self._embed_tokens.weight
        self.vocab_size: int = weight.shape[0]
        self.hidden_size: int = weight.shape[1]
        self.device: torch.device = weight.device
        self.dtype: torch.dtype = weight.dtype
        self.checks = PromptChecks(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            image_token_index=image_token_index,
            max_context=max_context,
            n_layers=self.decoder.n_layers,
            has_tokenizer=tokenizer is not None,
        )

    @property
    def n_layers(self) -> int:
        return self.decoder.n_layers

    @classmethod
    def load(
        cls,
        llava_dir: Path | str,
        *,
        device: str | torch.device = "cpu",
        dtype: DType = "auto",
        decode_tile: int = DECODE_TILE,
    ) -> LLMEngine:
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
            decode_tile=decode_tile,
        )
        logger.info(
            "language model ready: hidden %d, %d layers, vocab %d, %s on %s, eos %s, image token %d",
            engine.hidden_size,
            engine.n_layers,
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
        (checked before every forward pass). This is :meth:`start` and :meth:`step` for one
        sequence: the serving loop's batches give the same tokens.
        """
        return self._stream(self.prepare(request), is_cancelled or _never)

    def _stream(self, prepared: PreparedRequest, is_cancelled: Callable[[], bool]) -> Iterator[GenerationStep]:
        if is_cancelled():
            return
        sequence = self.start(prepared)
        while True:
            step = sequence.choose()
            yield step
            if step.finish_reason is not None or is_cancelled():
                return
            self.step([sequence])

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check ``request`` against this model; raise :class:`InvalidRequest` naming what is wrong."""
        return self.checks.prepare(request)

    def start(self, request: PreparedRequest | GenerationRequest) -> GenerationSequence:
        """Prefill one request; the sequence's first token is then ready to :meth:`~GenerationSequence.choose`."""
        prepared = request if isinstance(request, PreparedRequest) else self.prepare(request)
        options = prepared.sampling
        with torch.inference_mode():
            ids = prepared.input_ids.to(self.device)  # [n_prompt]
            embeds = prompt_embeddings(self._embed_tokens, ids, prepared.visual_embeds, self.image_token_index)
            cache = self.decoder.new_cache()
            prefill = self.decoder.prefill(embeds, prepared.image_spans, cache)
            # The head sees only the last position, as generate's logits_to_keep=1 does.
            logits = self.decoder.head(prefill.hidden[:, -1:, :])[:, -1]  # [1, vocab]
        stop_strings = None
        if options.stop:
            assert self._tokenizer is not None  # prepare() refused stop strings without one
            stop_strings = StopStrings(self._tokenizer, options.stop)
        return GenerationSequence(
            prepared,
            cache,
            logits,
            n_layers=self.n_layers,
            stop_ids=frozenset(self.eos_token_ids) | frozenset(options.stop_token_ids),
            stop_strings=stop_strings,
        )

    def step(self, sequences: Sequence[GenerationSequence]) -> None:
        """Feed every sequence's last chosen token in one batched forward; each gets its next logits."""
        if not sequences:
            return
        for sequence in sequences:
            if sequence.last_token is None or sequence.finished:
                raise RuntimeError("step() takes sequences that have chosen a token and not finished")
        with torch.inference_mode():
            token_ids = torch.tensor([s.last_token for s in sequences], dtype=torch.long, device=self.device)  # [B]
            positions = torch.tensor([s.position for s in sequences], dtype=torch.long, device=self.device)  # [B]
            logits = self.decoder.decode(token_ids, positions, [s.cache for s in sequences])  # [B, vocab]
        for i, sequence in enumerate(sequences):
            sequence.logits = logits[i : i + 1]
            sequence.position += 1


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
    "GenerationSequence",
    "GenerationStep",
    "ImageSpan",
    "LLMEngine",
    "PreparedRequest",
    "SamplingOptions",
    "StopStrings",
]
