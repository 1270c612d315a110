"""CLIP features kept between Analyze and Encode: in this worker's memory, and in Redis.

Analyze runs CLIP once per image; Encode, routed to the same worker (cache affinity), compresses
from the kept features at whatever count the budget allocated. The Redis level lets another
replica (after a failover) or a restarted worker skip CLIP too. Every CLIP hidden state of an
image is tens of MB for CLIP-L, so they stay in memory only unless settings say otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from compressor_plugins.protocol import ImageFeatures
from vision_worker.models import FeatureRequest

_TENSOR_FIELDS = (
    "patch_features",
    "cls_token",
    "projected_patches",
    "question_embedding",
    "question_embedding_last_position",
    "llm_tokens",
)


def request_signature(request: FeatureRequest) -> str:
    """Which inputs a feature set holds, as text for cache keys (the question by its hash)."""
    parts = [
        name
        for name in ("hidden_states", "cls_token", "last_block_qk", "projected_patches", "llm_tokens")
        if getattr(request, name)
    ]
    if request.question is not None:
        parts.append("question=" + hashlib.sha256(request.question.encode()).hexdigest()[:32])
    return ",".join(parts) or "patches"


def to_arrays(features: ImageFeatures, include_hidden_states: bool) -> dict[str, np.ndarray] | None:
    """The features as named CPU arrays for the cache; ``None`` when they cannot be stored."""
    if features.hidden_states is not None and not include_hidden_states:
        return None
    arrays: dict[str, np.ndarray] = {}
    for name in _TENSOR_FIELDS:
        value = getattr(features, name)
        if value is not None:
            arrays[name] = value.detach().cpu().numpy()
    if features.last_block_qk is not None:
        arrays["q"], arrays["k"] = (t.detach().cpu().numpy() for t in features.last_block_qk)
    if features.hidden_states is not None:
        for index, hidden in enumerate(features.hidden_states):
            arrays[f"hidden_{index}"] = hidden.detach().cpu().numpy()
    return arrays


def from_arrays(arrays: dict[str, np.ndarray], grid: tuple[int, int], device: torch.device) -> ImageFeatures:
    def tensor(name: str) -> torch.Tensor | None:
        return torch.from_numpy(arrays[name]).to(device) if name in arrays else None

    hidden = sorted((int(name.split("_")[1]), name) for name in arrays if name.startswith("hidden_"))
    return ImageFeatures(
        grid=grid,
        last_block_qk=(tensor("q"), tensor("k")) if "q" in arrays else None,
        hidden_states=tuple(tensor(name) for _, name in hidden) if hidden else None,
        **{name: tensor(name) for name in _TENSOR_FIELDS},
    )


def nbytes(features: ImageFeatures) -> int:
    total = 0
    for f in dataclasses.fields(features):
        value = getattr(features, f.name)
        values = value if isinstance(value, tuple) else (value,)
        total += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return total


@dataclass
class FeatureEntry:
    """An image's features and what compressing them unconstrained gave, per compressor setting."""

    features: ImageFeatures
    naturals: dict[str, int] = field(default_factory=dict)  # tokens key (unconstrained) -> count


class FeatureMemory:
    """A byte-bounded LRU of feature sets in this process."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[FeatureEntry, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> FeatureEntry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: str, entry: FeatureEntry) -> None:
        size = nbytes(entry.features)
        if size > self._max_bytes:
            return
        self.drop(key)
        self._entries[key] = (entry, size)
        self._bytes += size
        while self._bytes > self._max_bytes:
            self.drop(next(iter(self._entries)))

    def drop(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= found[1]

    def __len__(self) -> int:
        return len(self._entries)
