"""Compressor choices on the wire: a name and a ``google.protobuf.Struct`` of parameters."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from squint.common.v1 import types_pb2


def compressor_spec(name: str, params: dict[str, Any] | None = None) -> types_pb2.CompressorSpec:
    """A ``CompressorSpec`` message from a name and plain parameters."""
    spec = types_pb2.CompressorSpec(name=name)
    if params:
        struct = struct_pb2.Struct()
        struct.update(params)
        spec.params.CopyFrom(struct)
    return spec


def params_of(spec: types_pb2.CompressorSpec) -> dict[str, Any]:
    """The parameters of a ``CompressorSpec`` as plain values (JSON numbers arrive as floats)."""
    return json_format.MessageToDict(spec.params) if spec.HasField("params") else {}
