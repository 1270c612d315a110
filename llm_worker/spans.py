"""Image spans: in-LLM pooling directives placed in a prompt, and their form on the Triton wire.

A compressor's :class:`~compressor_plugins.protocol.LLMDirective` says "pool this image with
stride S after decoder layer K"; placed at its image's run of placeholders in ``input_ids``
it becomes an :class:`ImageSpan`. The orchestrator builds the spans and sends them with
:func:`span_tensors`; the LLM worker reads them back with :func:`spans_from_tensors`. These
two functions are the only conversion between spans and tensors, one each way.

On the wire (``config.pbtxt``):

- ``image_spans`` INT64 ``[n_spans, 5]``: one row per span, (start index in ``input_ids``,
  span length, layer K, stride S, shape code 1 = 1d / 2 = 2d);
- ``reference_mode`` BOOL ``[n_spans]``, optional: per row, pooled position ids as LLaVolta's
  released code computes them (float16 mean, truncated). One value applies to every row (the
  earlier ``[1]`` form); absent means false for every row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from compressor_plugins.pooling import pooled_count
from compressor_plugins.protocol import LLMDirective
from squint.errors import InvalidRequest

SpanShape = Literal["1d", "2d"]

# The ``image_spans`` shape column: the Triton contract's codes.
SPAN_SHAPES: dict[int, SpanShape] = {1: "1d", 2: "2d"}
_SHAPE_CODES = {shape: code for code, shape in SPAN_SHAPES.items()}
_COLUMNS = 5


@dataclass(frozen=True)
class ImageSpan:
    """An image's run of placeholder tokens in the prompt, pooled inside the LLM.

    ``start``: index of its first token in the prompt; ``length``: its tokens (a square grid
    for ``shape == "2d"``); ``layer``: K, the first decoder layer that sees it pooled;
    ``stride``: S, the window length in raster order (``"1d"``, the paper's) or the window
    side (``"2d"``). A tail shorter than a window is dropped, as ``avg_pool1d`` does.
    ``reference_mode``: this span's pooled position ids as LLaVolta's released code computes
    them (a float16 mean, truncated) instead of the exact floor of the mean.
    """

    start: int
    length: int
    layer: int
    stride: int
    shape: SpanShape = "1d"
    reference_mode: bool = False

    @classmethod
    def placed(cls, directive: LLMDirective, start: int, length: int) -> ImageSpan:
        """The span of an image whose compressor sent ``directive``, at ``start`` for ``length`` tokens."""
        return cls(
            start=start,
            length=length,
            layer=directive.layer,
            stride=directive.stride,
            shape=directive.shape,
            reference_mode=directive.reference_mode,
        )

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def side(self) -> int:
        """The grid side of a ``2d`` span (its length is ``side * side``)."""
        return math.isqrt(self.length)

    @property
    def pooled_length(self) -> int:
        """Tokens left after pooling."""
        return pooled_count(self.length, self.stride, self.shape)


def span_tensors(spans: Sequence[ImageSpan]) -> dict[str, np.ndarray]:
    """The Triton inputs carrying ``spans``: ``image_spans`` [n, 5] int64 and ``reference_mode``
    [n] bool, one row and one flag per span; empty when there are no spans."""
    if not spans:
        return {}
    rows = [[s.start, s.length, s.layer, s.stride, _SHAPE_CODES[s.shape]] for s in spans]
    return {
        "image_spans": np.array(rows, dtype=np.int64),  # [n_spans, 5]
        "reference_mode": np.array([s.reference_mode for s in spans], dtype=np.bool_),  # [n_spans]
    }


def spans_from_tensors(inputs: Mapping[str, np.ndarray]) -> tuple[ImageSpan, ...]:
    """The spans a request's ``image_spans`` and ``reference_mode`` tensors carry.

    Raises :class:`InvalidRequest` naming the tensor that is malformed. Whether each span
    fits the prompt and the model is the engine's check.
    """
    rows = np.asarray(inputs.get("image_spans", np.zeros((0, _COLUMNS), np.int64)))
    if rows.size and (rows.ndim != 2 or rows.shape[1] != _COLUMNS or rows.dtype.kind not in "iu"):
        raise InvalidRequest(
            "image_spans must be an integer tensor [n_spans, 5] of (start, length, layer, stride, "
            f"shape 1 = 1d / 2 = 2d) rows, got {rows.dtype} {list(rows.shape)}"
        )
    n_spans = rows.shape[0] if rows.size else 0
    flags = np.asarray(inputs.get("reference_mode", np.zeros(0, np.bool_))).reshape(-1)
    if flags.size == 1:
        flags = np.repeat(flags, n_spans)  # one value for every row
    elif flags.size and flags.size != n_spans:
        raise InvalidRequest(
            f"reference_mode holds {flags.size} values for {n_spans} image_spans rows; "
            "give one per row (or one for every row)"
        )
    spans = []
    for row, (start, length, layer, stride, code) in enumerate(rows.reshape(-1, _COLUMNS).tolist()):
        if code not in SPAN_SHAPES:
            raise InvalidRequest(f"image_spans row {row}: shape code {code} is neither 1 (1d) nor 2 (2d)")
        reference_mode = bool(flags[row]) if flags.size else False
        spans.append(ImageSpan(start, length, layer, stride, SPAN_SHAPES[code], reference_mode))
    return tuple(spans)


__all__ = ["SPAN_SHAPES", "ImageSpan", "SpanShape", "span_tensors", "spans_from_tensors"]
