"""The thumbnail as commander (after GlobalCom²): an image cut into crops (tiles) and shown whole as a thumbnail
spends one budget, split over the thumbnail and the crops by how much of the thumbnail's importance falls on each
crop's area of the image. LLaVA-NeXT (``vtr.adapters.llava.anyres``: unpadded crop maps) and InternVL
(``vtr.adapters.internvl.tiles``: a rows x cols grid of tiles) share it.

Both the thumbnail's token grid and the crops span the whole image, so a thumbnail token's score is spread over the
crop cells its square covers, by area; the budget split itself is ``vtr.budget.visual.split_budget`` (the thumbnail's
share by its token count, the crops' by these weights, capped at their tokens, exact).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def overlap(cells: int, bins: int) -> Tensor:
    """``[cells, bins]``: fraction of each of ``cells`` equal intervals of [0, 1] inside each of ``bins``."""
    i = torch.arange(cells, dtype=torch.float64)[:, None]
    j = torch.arange(bins, dtype=torch.float64)[None, :]
    low = torch.maximum(i / cells, j / bins)
    high = torch.minimum((i + 1) / cells, (j + 1) / bins)
    return (high - low).clamp_min(0.0) * cells


def grid_importance(scores: Tensor, rows: int, cols: int) -> Tensor:
    """``[rows, cols]``: the mass of a thumbnail's ``scores`` (``[side * side]``, raster order over its square
    token grid) falling on each cell of a ``rows x cols`` grid over the same image, by area (float64; the cells sum
    to the scores' sum)."""
    side = math.isqrt(scores.numel())
    if side * side != scores.numel():
        raise ValueError(f"a thumbnail's scores must cover a square grid of tokens, got {scores.numel()}")
    grid = scores.detach().double().cpu().view(side, side)
    return overlap(side, rows).T @ grid @ overlap(side, cols)


__all__ = ["grid_importance", "overlap"]
