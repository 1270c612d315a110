"""Compressor choices on the wire: a name and a ``google.protobuf.Struct`` of parameters."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format, struct_pb2

from squint.common.v1 import types_pb2
from squint.errors import InvalidRequest


def compressor_spec(name: str, params: dict[str, Any] | None = None) -> types_pb2.CompressorSpec:
    """A ``CompressorSpec`` message from a name and plain parameters."""
    spec = types_pb2.CompressorSpec(name=name)
    if params:
        struct = struct_pb2.Struct()
        struct.update(params)
        spec.params.CopyFrom(struct)
    return spec


def params_of(spec: types_pb2.CompressorSpec) -> dict[str, Any]:
    """The parameters of a ``CompressorSpec`` as plain values (JSON numbers arrive as floats).

    Raises :class:`InvalidRequest` naming the parameter when a number is NaN or infinite (JSON
    has no such numbers).
    """
    if not spec.HasField("params"):
        return {}
    for key, value in spec.params.fields.items():
        _check_value(value, f"compressor.params.{key}")
    return json_format.MessageToDict(spec.params)


def _check_value(value: struct_pb2.Value, where: str) -> None:
    kind = value.WhichOneof("kind")
    if kind == "number_value" and not math.isfinite(value.number_value):
        raise InvalidRequest(f"{where} is {value.number_value}; parameters must be finite numbers")
    if kind == "struct_value":
        for key, inner in value.struct_value.fields.items():
            _check_value(inner, f"{where}.{key}")
    elif kind == "list_value":
        for index, inner in enumerate(value.list_value.values):
            _check_value(inner, f"{where}[{index}]")
