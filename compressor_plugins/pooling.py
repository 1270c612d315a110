"""Average pooling of patch grids and image spans: the one copy that ``avgpool``, ``dfmr``,
``staged_pool`` and ``stf`` (before the LLM) and the LLM worker (inside it, at decoder layer K,
LLaVolta: docs/methods.md §2) share. Public: other packages import it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def window_covers(side: int, stride: int) -> tuple[tuple[int, ...], ...]:
    """Raster indices of the patches under each s x s window of a square grid, windows in raster order."""
    pooled = side // stride
    return tuple(
        tuple((wr * stride + dr) * side + (wc * stride + dc) for dr in range(stride) for dc in range(stride))
        for wr in range(pooled)
        for wc in range(pooled)
    )


def pooled_count(n_tokens: int, stride: int, shape: str) -> int:
    """Tokens left when ``n_tokens`` are pooled: ``"1d"`` windows of ``stride`` in raster order,
    or ``"2d"`` squares of ``stride`` x ``stride`` on the square grid; partial windows dropped."""
    if shape == "2d":
        return (math.isqrt(n_tokens) // stride) ** 2
    return n_tokens // stride


def pool_tokens_1d(tokens: torch.Tensor, stride: int) -> torch.Tensor:
    """Average consecutive windows of ``stride`` tokens in raster order; a short tail is dropped.

    [n, d] -> [n // stride, d], as ``avg_pool1d`` (the paper's pooling: S = 4 is a 1 x 4 strip).
    """
    return F.avg_pool1d(tokens.T.unsqueeze(0), kernel_size=stride, stride=stride)[0].T


def pool_tokens_2d(tokens: torch.Tensor, side: int, window: int) -> torch.Tensor:
    """Average ``window`` x ``window`` squares of a ``side`` x ``side`` grid, read in raster order.

    [side * side, d] -> [(side // window)^2, d]; a partial last row/column is dropped.
    """
    grid = tokens.T.reshape(1, tokens.shape[1], side, side)  # [1, d, side, side]
    return F.avg_pool2d(grid, kernel_size=window, stride=window).flatten(2)[0].T


def pooled_positions(positions: torch.Tensor, stride: int, reference_mode: bool) -> torch.Tensor:
    """Position id of each pooled window: the mean of its ids, truncated.

    ``reference_mode`` computes the mean in float16 as the released code does (exact below
    2048, rounded above); otherwise the exact integer floor of the mean.
    [n] -> [n // stride]
    """
    usable = positions.shape[0] // stride * stride
    windows = positions[:usable].reshape(-1, stride)  # [n // stride, stride]
    if reference_mode:
        return windows.to(torch.float16).mean(dim=1).to(torch.int64)
    return torch.div(windows.sum(dim=1), stride, rounding_mode="floor")


def pool_image_spans(
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    span_starts: Sequence[Sequence[int]],
    span_length: int,
    stride: int,
    reference_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every image span of every sample by its 1-D pooled windows.

    ``hidden`` [B, L, D]; ``position_ids`` [B or 1, L]; ``span_starts[b]`` lists where sample
    b's image spans begin, each ``span_length`` tokens. Other tokens keep their hidden states
    and their original position ids (no renumbering: the positions have gaps).
    Returns hidden [B, L', D] and position ids [B, L']; every sample must end equally long.
    """
    batch = hidden.shape[0]
    positions = position_ids.expand(batch, -1) if position_ids.shape[0] == 1 else position_ids
    out_hidden, out_positions = [], []
    for b in range(batch):
        pieces_h, pieces_p, cursor = [], [], 0
        for start in sorted(span_starts[b]):
            end = start + span_length
            pieces_h += [hidden[b, cursor:start], pool_tokens_1d(hidden[b, start:end], stride)]
            pieces_p += [positions[b, cursor:start], pooled_positions(positions[b, start:end], stride, reference_mode)]
            cursor = end
        pieces_h.append(hidden[b, cursor:])
        pieces_p.append(positions[b, cursor:])
        out_hidden.append(torch.cat(pieces_h))
        out_positions.append(torch.cat(pieces_p))
    lengths = {h.shape[0] for h in out_hidden}
    if len(lengths) != 1:
        raise ValueError(f"samples pool to different lengths {sorted(lengths)}; pad them to the same image count")
    return torch.stack(out_hidden), torch.stack(out_positions)
