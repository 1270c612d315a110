from squint.common.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("data", "max_frames", "fps")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    max_frames: int
    fps: float
    def __init__(self, data: _Optional[bytes] = ..., max_frames: _Optional[int] = ..., fps: _Optional[float] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("text", "image", "video")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Image
    video: Video
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., video: _Optional[_Union[Video, _Mapping]] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "repetition_penalty")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    repetition_penalty: float
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., repetition_penalty: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("chunks", "visual_token_budget", "compressor", "sampling", "request_id", "system_prompt", "return_coverage", "allocation_policy", "dedup_threshold", "context_limit", "messages", "pixel_dedup_threshold")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    RETURN_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_POLICY_FIELD_NUMBER: _ClassVar[int]
    DEDUP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PIXEL_DEDUP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    visual_token_budget: int
    compressor: _types_pb2.CompressorSpec
    sampling: SamplingParams
    request_id: str
    system_prompt: str
    return_coverage: bool
    allocation_policy: str
    dedup_threshold: float
    context_limit: int
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    pixel_dedup_threshold: float
    def __init__(self, chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., visual_token_budget: _Optional[int] = ..., compressor: _Optional[_Union[_types_pb2.CompressorSpec, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., system_prompt: _Optional[str] = ..., return_coverage: _Optional[bool] = ..., allocation_policy: _Optional[str] = ..., dedup_threshold: _Optional[float] = ..., context_limit: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., pixel_dedup_threshold: _Optional[float] = ...) -> None: ...

class MediaUsage(_message.Message):
    __slots__ = ("chunk_index", "kind", "tokens_before", "tokens_after", "compressor", "cache_hit", "cache_key", "encode_ms", "worker", "grid_height", "grid_width", "complexity", "coverage", "allocated_tokens", "duplicate_of", "timestamp_seconds", "features_cached", "skipped_before_clip")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_AFTER_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    COMPLEXITY_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_OF_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_CACHED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_BEFORE_CLIP_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    kind: str
    tokens_before: int
    tokens_after: int
    compressor: str
    cache_hit: bool
    cache_key: str
    encode_ms: float
    worker: str
    grid_height: int
    grid_width: int
    complexity: float
    coverage: _containers.RepeatedCompositeFieldContainer[_types_pb2.TokenCoverage]
    allocated_tokens: int
    duplicate_of: int
    timestamp_seconds: float
    features_cached: bool
    skipped_before_clip: bool
    def __init__(self, chunk_index: _Optional[int] = ..., kind: _Optional[str] = ..., tokens_before: _Optional[int] = ..., tokens_after: _Optional[int] = ..., compressor: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., cache_key: _Optional[str] = ..., encode_ms: _Optional[float] = ..., worker: _Optional[str] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., complexity: _Optional[float] = ..., coverage: _Optional[_Iterable[_Union[_types_pb2.TokenCoverage, _Mapping]]] = ..., allocated_tokens: _Optional[int] = ..., duplicate_of: _Optional[int] = ..., timestamp_seconds: _Optional[float] = ..., features_cached: _Optional[bool] = ..., skipped_before_clip: _Optional[bool] = ...) -> None: ...

class FrameCounts(_message.Message):
    __slots__ = ("sampled", "analysed", "kept")
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    ANALYSED_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    sampled: int
    analysed: int
    kept: int
    def __init__(self, sampled: _Optional[int] = ..., analysed: _Optional[int] = ..., kept: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("encode_ms", "time_to_first_token_ms", "total_ms")
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    encode_ms: float
    time_to_first_token_ms: float
    total_ms: float
    def __init__(self, encode_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "visual_tokens", "visual_token_budget", "media", "timings", "allocation_policy", "frames")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_POLICY_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int
    visual_token_budget: int
    media: _containers.RepeatedCompositeFieldContainer[MediaUsage]
    timings: Timings
    allocation_policy: str
    frames: FrameCounts
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., visual_tokens: _Optional[int] = ..., visual_token_budget: _Optional[int] = ..., media: _Optional[_Iterable[_Union[MediaUsage, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., allocation_policy: _Optional[str] = ..., frames: _Optional[_Union[FrameCounts, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finish_reason", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...
