"""Visual tokens as the orchestrator holds them between the vision and LLM workers.

Today the tokens travel inline (vision worker -> orchestrator -> Triton). A by-reference
transport (tokens left in the cache or sent straight to the LLM worker, the orchestrator
forwarding keys, as vLLM's encoder disaggregation does) changes this module, not the API.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from squint import tensors
from squint.vision.v1 import vision_worker_pb2 as pb


@dataclass(frozen=True)
class VisualTokens:
    """The tokens of one image or frame in the LLM's embedding space."""

    rows: int
    _inline: np.ndarray  # [rows, llm_hidden]

    @classmethod
    def from_reply(cls, message: pb.VisualTokens, label: str) -> VisualTokens:
        if message.WhichOneof("payload") != "inline":
            raise ValueError(f"{label}: the vision worker sent tokens by a transport this orchestrator lacks")
        array = tensors.from_proto(message.inline, f"{label}.tokens")
        if array.ndim != 2:
            raise ValueError(f"{label}: visual tokens must be [n, hidden], got shape {array.shape}")
        return cls(rows=int(array.shape[0]), _inline=array)

    def materialize(self) -> np.ndarray:
        """The tokens as an array, [rows, llm_hidden]."""
        return self._inline
