from squint.common.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageInput(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("images", "labels", "compressor", "request_id", "question")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    labels: _containers.RepeatedScalarFieldContainer[str]
    compressor: _types_pb2.CompressorSpec
    request_id: str
    question: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., compressor: _Optional[_Union[_types_pb2.CompressorSpec, _Mapping]] = ..., request_id: _Optional[str] = ..., question: _Optional[str] = ...) -> None: ...

class ImageAnalysis(_message.Message):
    __slots__ = ("grid_height", "grid_width", "tokens_before", "predicted_tokens", "content_hash", "levels", "complexity", "descriptor", "features_cached")
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    COMPLEXITY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    FEATURES_CACHED_FIELD_NUMBER: _ClassVar[int]
    grid_height: int
    grid_width: int
    tokens_before: int
    predicted_tokens: int
    content_hash: str
    levels: _containers.RepeatedScalarFieldContainer[int]
    complexity: float
    descriptor: _types_pb2.Tensor
    features_cached: bool
    def __init__(self, grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., tokens_before: _Optional[int] = ..., predicted_tokens: _Optional[int] = ..., content_hash: _Optional[str] = ..., levels: _Optional[_Iterable[int]] = ..., complexity: _Optional[float] = ..., descriptor: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ..., features_cached: _Optional[bool] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("images", "worker")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageAnalysis]
    worker: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageAnalysis, _Mapping]]] = ..., worker: _Optional[str] = ...) -> None: ...

class EncodeItem(_message.Message):
    __slots__ = ("image", "compressor", "question", "max_tokens", "label", "return_coverage")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    RETURN_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    image: ImageInput
    compressor: _types_pb2.CompressorSpec
    question: str
    max_tokens: int
    label: str
    return_coverage: bool
    def __init__(self, image: _Optional[_Union[ImageInput, _Mapping]] = ..., compressor: _Optional[_Union[_types_pb2.CompressorSpec, _Mapping]] = ..., question: _Optional[str] = ..., max_tokens: _Optional[int] = ..., label: _Optional[str] = ..., return_coverage: _Optional[bool] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("items", "request_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EncodeItem]
    request_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[EncodeItem, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class VisualTokens(_message.Message):
    __slots__ = ("inline",)
    INLINE_FIELD_NUMBER: _ClassVar[int]
    inline: _types_pb2.Tensor
    def __init__(self, inline: _Optional[_Union[_types_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("tokens", "tokens_before", "tokens_after", "cache_hit", "cache_key", "encode_ms", "compressor", "content_hash", "grid_height", "grid_width", "coverage", "complexity", "directive")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_AFTER_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    COMPLEXITY_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVE_FIELD_NUMBER: _ClassVar[int]
    tokens: VisualTokens
    tokens_before: int
    tokens_after: int
    cache_hit: bool
    cache_key: str
    encode_ms: float
    compressor: str
    content_hash: str
    grid_height: int
    grid_width: int
    coverage: _containers.RepeatedCompositeFieldContainer[_types_pb2.TokenCoverage]
    complexity: float
    directive: _types_pb2.InLLMDirective
    def __init__(self, tokens: _Optional[_Union[VisualTokens, _Mapping]] = ..., tokens_before: _Optional[int] = ..., tokens_after: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., cache_key: _Optional[str] = ..., encode_ms: _Optional[float] = ..., compressor: _Optional[str] = ..., content_hash: _Optional[str] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., coverage: _Optional[_Iterable[_Union[_types_pb2.TokenCoverage, _Mapping]]] = ..., complexity: _Optional[float] = ..., directive: _Optional[_Union[_types_pb2.InLLMDirective, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("images", "worker")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    worker: str
    def __init__(self, images: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ..., worker: _Optional[str] = ...) -> None: ...

class SmallestRequest(_message.Message):
    __slots__ = ("compressor", "request_id")
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    compressor: _types_pb2.CompressorSpec
    request_id: str
    def __init__(self, compressor: _Optional[_Union[_types_pb2.CompressorSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SmallestResponse(_message.Message):
    __slots__ = ("tokens", "grid_height", "grid_width")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    grid_height: int
    grid_width: int
    def __init__(self, tokens: _Optional[int] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ...) -> None: ...

class ListCompressorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CompressorParameter(_message.Message):
    __slots__ = ("name", "type", "default_json", "minimum_json", "maximum_json", "choices", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_JSON_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_JSON_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_json: str
    minimum_json: str
    maximum_json: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_json: _Optional[str] = ..., minimum_json: _Optional[str] = ..., maximum_json: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ...) -> None: ...

class CompressorInfo(_message.Message):
    __slots__ = ("name", "summary", "parameters", "output_space", "distribution", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SPACE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    parameters: _containers.RepeatedCompositeFieldContainer[CompressorParameter]
    output_space: str
    distribution: str
    version: str
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[CompressorParameter, _Mapping]]] = ..., output_space: _Optional[str] = ..., distribution: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ListCompressorsResponse(_message.Message):
    __slots__ = ("compressors",)
    COMPRESSORS_FIELD_NUMBER: _ClassVar[int]
    compressors: _containers.RepeatedCompositeFieldContainer[CompressorInfo]
    def __init__(self, compressors: _Optional[_Iterable[_Union[CompressorInfo, _Mapping]]] = ...) -> None: ...
