"""Tensors on the wire: raw little-endian bytes with their dtype and shape."""

from __future__ import annotations

import math

import numpy as np
import torch

from squint.common.v1 import types_pb2
from squint.errors import InvalidRequest

# The dtypes Squint ships: float32 for CPU packs, float16 for GPU packs. Triton's python
# backend has no numpy bfloat16, so bfloat16 models ship float16 tokens.
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}


def to_proto(array: np.ndarray | torch.Tensor) -> types_pb2.Tensor:
    """Pack a CPU numpy array or torch tensor (float32 or float16) into a ``Tensor`` message."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    name = array.dtype.name
    if name not in WIRE_DTYPES:
        raise TypeError(f"cannot ship dtype {name}; expected one of {sorted(WIRE_DTYPES)}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return types_pb2.Tensor(dtype=name, shape=list(array.shape), data=data)


def from_proto(message: types_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Unpack a ``Tensor`` message; ``field`` names it in the error when it is inconsistent."""
    if message.dtype not in WIRE_DTYPES:
        raise InvalidRequest(f"{field}.dtype {message.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    if any(dim < 0 for dim in message.shape):
        raise InvalidRequest(f"{field}.shape {list(message.shape)} has a negative dimension")
    dtype = np.dtype(WIRE_DTYPES[message.dtype]).newbyteorder("<")
    expected = math.prod(message.shape) * dtype.itemsize
    if len(message.data) != expected:
        raise InvalidRequest(
            f"{field}.data holds {len(message.data)} bytes but shape {list(message.shape)} "
            f"of {message.dtype} needs {expected}"
        )
    return np.frombuffer(message.data, dtype=dtype).reshape(tuple(message.shape)).astype(dtype.newbyteorder("="))
