"""The orchestrator's domain objects, free of protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class ImageChunk:
    data: bytes  # an encoded image file
    max_tokens: int = 0  # at most this many visual tokens (OpenAI's detail "low"); 0: the budget decides


@dataclass(frozen=True)
class VideoChunk:
    data: bytes  # an encoded video file
    max_frames: int = 0
    fps: float = 0.0


Chunk = TextChunk | ImageChunk | VideoChunk

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One message of a conversation: a role and its parts in order."""

    role: str
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Sampling:
    """How to decode; zeros mean "the server's default" or "off", as in the API."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 0.0


@dataclass(frozen=True)
class GenerationRequest:
    chunks: tuple[Chunk, ...]
    request_id: str
    visual_token_budget: int = 0
    compressor: str = ""
    compressor_params: dict[str, Any] = field(default_factory=dict)
    sampling: Sampling = field(default_factory=Sampling)
    system_prompt: str = ""
    return_coverage: bool = False
    allocation_policy: str = ""  # empty: the server's default
    dedup_threshold: float | None = None  # None: the server's default
    pixel_dedup_threshold: float | None = None  # None: the server's default
    context_limit: int = 0
    client: str = ""  # who asks (its token's identity, or its address), for per-client limits
    deadline: float | None = None  # time.monotonic() at which the client stops waiting; None: it set none
    # A conversation; ``chunks`` then holds every message's parts in order. Empty: ``chunks`` is
    # one user message (the single-turn form).
    messages: tuple[Message, ...] = ()

    @classmethod
    def of_conversation(cls, messages: tuple[Message, ...], request_id: str, **fields: Any) -> GenerationRequest:
        """A request answering the conversation's last user message."""
        chunks = tuple(chunk for message in messages for chunk in message.chunks)
        return cls(chunks=chunks, request_id=request_id, messages=messages, **fields)

    @property
    def turns(self) -> tuple[Message, ...]:
        """The conversation, whichever form the request came in."""
        return self.messages or (Message("user", self.chunks),)

    def chunk_labels(self) -> list[str]:
        """How errors name each chunk: ``chunks[i]``, or ``messages[m].content[c]`` in a conversation."""
        if not self.messages:
            return [f"chunks[{i}]" for i in range(len(self.chunks))]
        return [
            f"messages[{m}].content[{c}]" for m, message in enumerate(self.messages) for c in range(len(message.chunks))
        ]

    def question(self) -> str:
        """The text of the last user message: what a text-guided compressor looks for."""
        users = [message for message in self.turns if message.role == "user"]
        return " ".join(c.text for c in (users[-1].chunks if users else ()) if isinstance(c, TextChunk))


@dataclass(frozen=True)
class MediaUsage:
    chunk_index: int
    kind: str
    tokens_before: int
    tokens_after: int
    compressor: str
    cache_hit: bool
    cache_key: str
    encode_ms: float
    worker: str
    grid: tuple[int, int] = (0, 0)
    complexity: float | None = None
    coverage: tuple[tuple[int, ...], ...] = ()
    allocated_tokens: int = 0
    duplicate_of: int | None = None  # position in Usage.media of the frame this one repeats
    timestamp: float | None = None
    features_cached: bool = False
    skipped_before_clip: bool = False  # a frame whose pixels repeat an earlier one: no CLIP forward


@dataclass(frozen=True)
class Timings:
    encode_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class FrameCounts:
    """A request's video frames: sampled from the videos, analysed by CLIP (the rest repeated an
    earlier frame's pixels), kept in the prompt (the rest were near-duplicates after CLIP too)."""

    sampled: int = 0
    analysed: int = 0
    kept: int = 0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int
    visual_token_budget: int
    media: tuple[MediaUsage, ...]
    timings: Timings
    allocation_policy: str = ""
    frames: FrameCounts = field(default_factory=lambda: FrameCounts())


@dataclass(frozen=True)
class TextDelta:
    """New text and token ids since the previous event."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The end of a generation: why, and what it used."""

    finish_reason: str
    usage: Usage


GenerationEvent = TextDelta | Finished
