"""How much detail an image holds: LLaVA-Zip's mean window standard deviation, σ̄ (docs/methods.md §1).

DFMR chooses its pooling factor by σ̄; the orchestrator's ``complexity`` budget policy weighs every
item by it, whatever its compressor. The vision worker reports :func:`image_complexity` for every
image and frame whose compressor gives no complexity of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The window of the complexity the worker reports: DFMR's second candidate factor by default.
REPORTED_WINDOW = 2


def normalise(patches: torch.Tensor, feature_norm: str) -> torch.Tensor:
    """[n, d] -> [n, d], per token: ``layernorm`` (no affine), ``l2``, or ``none``."""
    if feature_norm == "layernorm":
        return F.layer_norm(patches, patches.shape[-1:])
    if feature_norm == "l2":
        return F.normalize(patches, dim=-1)
    return patches


def mean_window_std(grid: torch.Tensor, p: int) -> float:
    """σ̄(p) of a [d, height, width] map: windows of p x p, population std per channel,
    averaged over channels and windows (the edge rows and columns that fill no window are
    left out). σ̄(1) = 0."""
    if p == 1:
        return 0.0
    d, height, width = grid.shape
    rows, cols = height // p, width // p
    windows = grid[:, : rows * p, : cols * p].reshape(d, rows, p, cols, p)  # [d, rows, p, cols, p]
    windows = windows.permute(0, 1, 3, 2, 4).reshape(d, -1, p * p)  # [d, n_windows, p * p]
    return windows.float().std(dim=-1, unbiased=False).mean().item()


def image_complexity(
    patch_features: torch.Tensor, grid: tuple[int, int], window: int = REPORTED_WINDOW, feature_norm: str = "layernorm"
) -> float:
    """σ̄(window) of an image's [n, d] CLIP patch features on its (height, width) grid."""
    height, width = grid
    window = min(window, height, width)
    features = normalise(patch_features.float(), feature_norm)
    return mean_window_std(features.T.reshape(-1, height, width), window)
