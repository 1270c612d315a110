"""Image spans on the Triton wire: one conversion each way, every field kept per span."""

from __future__ import annotations

import numpy as np

from compressor_plugins.protocol import LLMDirective
from llm_worker.spans import ImageSpan, span_tensors, spans_from_tensors

SPANS = (
    ImageSpan(5, 576, 2, 8, "1d", reference_mode=True),
    ImageSpan(600, 576, 0, 4, "2d"),
    ImageSpan(1300, 144, 31, 3, "2d", reference_mode=True),
)


def test_spans_round_trip_through_the_triton_tensors() -> None:
    tensors = span_tensors(SPANS)
    assert set(tensors) == {"image_spans", "reference_mode"}
    assert tensors["image_spans"].dtype == np.int64 and tensors["image_spans"].shape == (3, 5)
    assert tensors["image_spans"][1].tolist() == [600, 576, 0, 4, 2]  # the shape travels as its code
    assert tensors["reference_mode"].dtype == np.bool_ and tensors["reference_mode"].tolist() == [True, False, True]
    assert spans_from_tensors(tensors) == SPANS


def test_no_spans_send_no_tensors() -> None:
    assert span_tensors(()) == {}
    assert spans_from_tensors({}) == ()


def test_a_directive_is_placed_with_every_field() -> None:
    directive = LLMDirective(layer=3, stride=4, shape="2d", reference_mode=True)
    assert ImageSpan.placed(directive, start=7, length=576) == ImageSpan(7, 576, 3, 4, "2d", reference_mode=True)
    assert ImageSpan.placed(LLMDirective(1, 8), 0, 64) == ImageSpan(0, 64, 1, 8, "1d", reference_mode=False)
