"""Compressor parameters on the wire."""

import math

import pytest
from google.protobuf import struct_pb2

from squint.common.v1 import types_pb2
from squint.errors import InvalidRequest
from squint.wire import compressor_spec, params_of


def test_parameters_round_trip():
    params = {"stride": 3, "shape": "2d", "on": True, "none": None, "nested": {"list": [1, "a"]}}
    assert params_of(compressor_spec("avgpool", params)) == {**params, "stride": 3.0, "nested": {"list": [1.0, "a"]}}
    assert params_of(types_pb2.CompressorSpec(name="none")) == {}


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"stride": math.inf}, "compressor.params.stride is inf"),
        ({"stride": -math.inf}, "compressor.params.stride is -inf"),
        ({"deep": {"x": [1, math.nan]}}, r"compressor.params.deep.x\[1\] is nan"),
    ],
)
def test_numbers_json_cannot_hold_are_invalid_arguments_naming_the_parameter(params, where):
    spec = types_pb2.CompressorSpec(name="avgpool")
    struct = struct_pb2.Struct()
    struct.update(params)
    spec.params.CopyFrom(struct)
    with pytest.raises(InvalidRequest, match=where + "; parameters must be finite numbers"):
        params_of(spec)
