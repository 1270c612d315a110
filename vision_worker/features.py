"""CLIP outputs kept between Analyze and Encode: in this worker's memory, and in Redis.

Analyze runs CLIP once per image; Encode, routed to the same worker (cache affinity), compresses
from the kept features at whatever count the budget allocated, and takes the tokens Analyze
produced from memory rather than reading them back. An image has one feature set, whatever the
compressor or question: a compressor needing more than the set holds runs CLIP once for the union.
A question's text embedding is kept on its own, so a new question about a known image runs only
the text tower. The Redis level lets another replica (after a failover) or a restarted worker skip
CLIP too. Every CLIP hidden state of an image is tens of MB for CLIP-L, so they stay in memory
only unless settings say otherwise.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from compressor_plugins.complexity import image_complexity
from compressor_plugins.protocol import ImageFeatures
from vision_worker.cache import CachedTensors
from vision_worker.models import FeatureRequest

# The image inputs a feature set may hold (the question's embedding is kept on its own, and the
# projected patch features are derived when a compressor runs).
_TENSOR_FIELDS = ("patch_features", "cls_token", "projected_patches")


def held(features: ImageFeatures) -> FeatureRequest:
    """What a feature set holds, as the request that would compute it."""
    return FeatureRequest(
        hidden_states=features.hidden_states is not None,
        cls_token=features.cls_token is not None,
        last_block_qk=features.last_block_qk is not None,
        projected_patches=features.projected_patches is not None,
    )


def holds(features: ImageFeatures, request: FeatureRequest) -> bool:
    """Whether a feature set has every image input ``request`` asks for."""
    have = held(features)
    return all(
        getattr(have, name) or not getattr(request, name)
        for name in ("hidden_states", "cls_token", "last_block_qk", "projected_patches")
    )


def widened(features: ImageFeatures | None, request: FeatureRequest) -> FeatureRequest:
    """What to compute for ``request`` so that the result also holds what ``features`` held:
    one feature set per image serves every compressor asked of it so far."""
    wanted = request.image_part()
    if features is None:
        return wanted
    have = held(features)
    return dataclasses.replace(
        wanted,
        **{
            name: getattr(wanted, name) or getattr(have, name)
            for name in ("hidden_states", "last_block_qk", "projected_patches")
        },
    )


def to_arrays(features: ImageFeatures, include_hidden_states: bool) -> dict[str, np.ndarray]:
    """The features as named CPU arrays for the cache, every hidden state only when
    ``include_hidden_states`` (tens of MB an image for CLIP-L)."""
    arrays: dict[str, np.ndarray] = {}
    for name in _TENSOR_FIELDS:
        value = getattr(features, name)
        if value is not None:
            arrays[name] = value.detach().cpu().numpy()
    if features.last_block_qk is not None:
        arrays["q"], arrays["k"] = (t.detach().cpu().numpy() for t in features.last_block_qk)
    if features.hidden_states is not None and include_hidden_states:
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


@dataclass(frozen=True)
class KeptTokens:
    """Tokens Analyze produced, kept for the request's Encode: ``cached`` when Analyze read them
    from the cache, not when it computed them (Encode then reports no cache hit)."""

    value: CachedTensors
    cached: bool

    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.value.tensors.values())


@dataclass
class FeatureEntry:
    """An image's features, what compressing them unconstrained gave per compressor setting, and
    the tokens Analyze produced, kept for the Encode of the same request."""

    features: ImageFeatures
    naturals: dict[str, int] = field(default_factory=dict)  # tokens key (unconstrained) -> count
    kept: dict[str, KeptTokens] = field(default_factory=dict)  # tokens key -> tokens, until Encode takes them
    _complexity: float | None = None

    def complexity(self) -> float:
        """σ̄ of the features (LLaVA-Zip's measure, docs/methods.md), computed on first use."""
        if self._complexity is None:
            self._complexity = image_complexity(self.features.patch_features, tuple(self.features.grid))
        return self._complexity

    def nbytes(self) -> int:
        return nbytes(self.features) + sum(kept.nbytes() for kept in self.kept.values())


class FeatureMemory:
    """A byte-bounded LRU of feature sets in this process, with the tokens kept beside them: the
    bound (``features_memory_bytes``) covers both."""

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
        self.drop(key)
        self._add(key, entry)

    def keep_tokens(self, key: str, tokens_key: str, kept: KeptTokens) -> None:
        """Keep tokens computed (or read) from the features under ``key`` until Encode takes them;
        nothing is kept when those features are no longer here."""
        entry = self.get(key)
        if entry is None:
            return
        self.drop(key)
        entry.kept[tokens_key] = kept
        self._add(key, entry)

    def take_tokens(self, key: str, tokens_key: str) -> KeptTokens | None:
        """The tokens kept under ``tokens_key`` beside the features under ``key``, handed over once."""
        entry = self.get(key)
        if entry is None or tokens_key not in entry.kept:
            return None
        self.drop(key)
        value = entry.kept.pop(tokens_key)
        self._add(key, entry)
        return value

    def _add(self, key: str, entry: FeatureEntry) -> None:
        size = entry.nbytes()
        if size > self._max_bytes:
            entry.kept.clear()  # the features alone may still fit
            size = entry.nbytes()
            if size > self._max_bytes:
                return
        self._entries[key] = (entry, size)
        self._bytes += size
        while self._bytes > self._max_bytes:
            self.drop(next(iter(self._entries)))

    def drop(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= found[1]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


class QuestionMemory:
    """A count-bounded LRU of questions' CLIP text embeddings in this process (a few KB each)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: str, embedding: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._entries[key] = embedding
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
