"""Text on the LLM worker's Triton wire, as UINT8 tensors of UTF-8 bytes.

Triton's python backend stub (2.51) cannot read or write BYTES tensors beside numpy 2, which
vLLM needs; every tensor into and out of ``model.py`` crosses by DLPack, and DLPack has no
strings. So the two text fields travel as bytes:

- ``stop`` UINT8 ``[n]``: the stop strings as a JSON array, UTF-8 (``["\\n", "User:"]``);
- ``finish_reason`` UINT8 ``[n]``: ASCII ``stop`` or ``length`` on the final response, empty
  before it.

These functions are the only conversion, one each way per field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from squint.errors import InvalidRequest


def stop_tensor(stop: Sequence[str]) -> np.ndarray:
    """``stop`` as the request's UINT8 tensor [n_bytes]."""
    return np.frombuffer(json.dumps(list(stop), ensure_ascii=False).encode(), dtype=np.uint8).copy()


def stop_strings(tensor: np.ndarray) -> tuple[str, ...]:
    """The stop strings a ``stop`` tensor carries; :class:`InvalidRequest` naming what is wrong."""
    array = np.asarray(tensor)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise InvalidRequest(
            f"stop must be a 1-D UINT8 tensor (a UTF-8 JSON array), got {array.dtype} {list(array.shape)}"
        )
    try:
        value = json.loads(array.tobytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"stop is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"stop is not a JSON array of strings: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("stop must be a JSON array of strings")
    return tuple(value)


def finish_reason_tensor(reason: str) -> np.ndarray:
    """``reason`` ("" before the final response) as the response's UINT8 tensor [n_bytes]."""
    return np.frombuffer(reason.encode("ascii"), dtype=np.uint8).copy()


def finish_reason(tensor: np.ndarray | None) -> str:
    """The finish reason a response's ``finish_reason`` tensor carries ("" when none)."""
    return "" if tensor is None else np.asarray(tensor, dtype=np.uint8).tobytes().decode("ascii")


__all__ = ["finish_reason", "finish_reason_tensor", "stop_strings", "stop_tensor"]
