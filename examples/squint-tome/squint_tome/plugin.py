"""``tome``: bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster").

The patch tokens alternate into two sets, A (even raster positions) and B (odd). Every A token
finds its most similar B token (cosine similarity of the features); the ``r`` most similar
pairs merge, the A token averaged into its B partner (weighted by how many patches each already
holds). One round removes ``r`` = ``ratio`` x n tokens, at most half of them. Output tokens
stay in raster order of the first patch they cover, then go through the LLaVA projector.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from compressor_plugins import hookimpl
from compressor_plugins.protocol import CompressedImage, CompressorInput, ImageFeatures, OutputSpace, ParamSpec


class BipartiteMerge:
    name: ClassVar[str] = "tome"
    summary: ClassVar[str] = "ToMe bipartite soft matching: merge the most similar token pairs"
    params: ClassVar[tuple[ParamSpec, ...]] = (
        ParamSpec("ratio", float, 0.5, minimum=0.0, maximum=0.5, description="share of tokens merged away"),
    )
    needs: ClassVar[frozenset[CompressorInput]] = frozenset({CompressorInput.PATCH_FEATURES})
    output_space: ClassVar[OutputSpace] = OutputSpace.VISION

    def predict_tokens(self, grid: tuple[int, int], params: Mapping[str, Any]) -> int:
        n = grid[0] * grid[1]
        return n - self._merged(n, params["ratio"])

    @staticmethod
    def _merged(n: int, ratio: float) -> int:
        return min(int(n * ratio), n // 2)  # at most every A token merges once

    def compress(self, features: ImageFeatures, params: Mapping[str, Any]) -> CompressedImage:
        tokens = features.patch_features  # [n, d]
        n = tokens.shape[0]
        r = self._merged(n, params["ratio"])
        a_idx = torch.arange(0, n, 2)  # [n_a] raster positions of set A
        b_idx = torch.arange(1, n, 2)  # [n_b]
        if r == 0 or len(b_idx) == 0:
            return CompressedImage(tokens=tokens, covers=tuple((i,) for i in range(n)))
        normed = F.normalize(tokens.float(), dim=-1)
        similarity = normed[a_idx] @ normed[b_idx].T  # [n_a, n_b]
        best_score, best_b = similarity.max(dim=-1)  # [n_a]
        # Stable order so ties merge the same pairs every time.
        order = torch.argsort(best_score, descending=True, stable=True)
        merged_a = order[:r]

        sums = tokens[b_idx].clone()  # [n_b, d]
        sizes = torch.ones(len(b_idx), dtype=tokens.dtype)
        covers: list[list[int]] = [[int(b)] for b in b_idx]
        for a in merged_a.tolist():
            b = int(best_b[a])
            sums[b] += tokens[a_idx[a]]
            sizes[b] += 1
            covers[b].append(int(a_idx[a]))
        merged_b = sums / sizes[:, None]  # [n_b, d]

        kept_a = sorted(set(range(len(a_idx))) - set(merged_a.tolist()))
        outputs = [(int(a_idx[a]), tokens[a_idx[a]], [int(a_idx[a])]) for a in kept_a]
        outputs += [(min(covers[b]), merged_b[b], sorted(covers[b])) for b in range(len(b_idx))]
        outputs.sort(key=lambda item: item[0])
        return CompressedImage(
            tokens=torch.stack([t for _, t, _ in outputs]).to(tokens.dtype),  # [n - r, d]
            covers=tuple(tuple(c) for _, _, c in outputs),
            notes={"merged_pairs": r},
        )


@hookimpl
def squint_register_compressors(registry) -> None:
    registry.register(BipartiteMerge)
