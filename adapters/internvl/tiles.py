"""InternVL with ``split="thumbnail"``: one budget per *image*, split over its thumbnail and its tiles by the
thumbnail (GlobalCom²'s "thumbnail as commander", as LLaVA-NeXT splits its crops: ``vtr.adapters.vlm.thumbnail``).

An image is a run of placeholders, tile after tile, its thumbnail last when it has several tiles (one tile: no
thumbnail, and it keeps ``min(budget, n)``). For an image of ``T`` tiles and its thumbnail, ``n`` tokens each:

1. The layout: the processor cut the image into a ``rows x cols`` grid (``rows * cols = T``) that the prompt does not
   record, so it is read from the pixels: of every ``rows x cols`` arrangement of the tiles, the one whose stitched
   canvas, area-pooled, is closest to the thumbnail pooled alike (both show the whole image; the first such
   arrangement, fewest rows first, on a tie: a flat image).
2. The thumbnail's score per token: the attention it receives in the tower where the family offers it, else (today)
   the norm of its projected feature, the score methods fall back on without a [CLS] token
   (``vtr.reducers.select.attention_scores``); spread over the tiles' areas (``grid_importance``).
3. The budget: the thumbnail keeps a share of ``budget`` by its token count (``round(budget / (T + 1))``, at least
   one, leaving one for the tiles); the tiles share the rest by their weights, each capped at ``n``, exact (largest
   remainder); a tile given nothing is dropped from the prompt. ``budget >= (T + 1) n`` keeps the image whole.

Each tile (and the thumbnail) is then reduced to its share by the patched method, on its own grid, as before.
``vtr.expected_tokens`` / ``vtr.expected_flops`` still describe a one-tile image (``min(budget, n)``): an image's
split is only known from its pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from vtr.budget.visual import split_budget

from ..vlm.items import Visual
from ..vlm.thumbnail import grid_importance

POOLED = 8   # side of the grid the layout is matched on: coarse enough that resampling differences vanish


@dataclass
class TileSplit:
    """How one image's budget went (``vtr.report(model).tiles``, one per image): its tile grid, the tokens its
    thumbnail and each tile (row-major) kept, and the thumbnail's weight over each tile (None: nothing reduced)."""

    rows: int
    cols: int
    thumbnail_kept: int
    tile_budgets: list[int]
    tile_weights: Optional[list[float]] = None


def images_of(items: list[Visual]) -> list[list[int]]:
    """The tiles (item indices) of each image: consecutive tiles in one run of placeholders of one row."""
    images: list[list[int]] = []
    for i, item in enumerate(items):
        previous = items[i - 1] if i else None
        if previous is not None and previous.row == item.row and int(item.columns[0]) == int(previous.columns[-1]) + 1:
            images[-1].append(i)
        else:
            images.append([i])
    return images


def tile_layout(tiles: Tensor, thumbnail: Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of the grid ``tiles`` ``[T, C, s, s]`` (row-major) were cut in: the arrangement whose
    stitched canvas is closest to ``thumbnail`` ``[C, s, s]`` at :data:`POOLED` x :data:`POOLED` (area means)."""
    count, channels, side, _ = tiles.shape
    pool = min(POOLED, side)
    target = torch.nn.functional.adaptive_avg_pool2d(thumbnail.double()[None], pool)
    best, layout = None, (1, count)
    for rows in range(1, count + 1):
        if count % rows:
            continue
        cols = count // rows
        canvas = tiles.double().view(rows, cols, channels, side, side).permute(2, 0, 3, 1, 4)
        canvas = canvas.reshape(1, channels, rows * side, cols * side)
        error = float((torch.nn.functional.adaptive_avg_pool2d(canvas, pool) - target).pow(2).mean())
        if best is None or error < best:
            best, layout = error, (rows, cols)
    return layout


def thumbnail_scores(features: Tensor, received: Optional[Tensor] = None) -> Tensor:
    """``[n]`` importance of each thumbnail token: the attention it receives in the tower, else its feature norm."""
    return (received if received is not None else features.float().norm(dim=-1)).double()


def split_image(budget: int, tile_tokens: int, rows: int, cols: int, scores: Tensor) -> TileSplit:
    """How an image of ``rows x cols`` tiles and a thumbnail, ``tile_tokens`` each, spends ``budget``."""
    count = rows * cols
    if budget >= (count + 1) * tile_tokens:
        return TileSplit(rows, cols, tile_tokens, [tile_tokens] * count)
    weights = grid_importance(scores, rows, cols).flatten()
    thumbnail, tiles = split_budget(budget, tile_tokens, [tile_tokens] * count, weights)
    return TileSplit(rows, cols, thumbnail, tiles, weights.tolist())


def tile_budgets(budget: int, items: list[Visual], pixel_values: Tensor, tile_tokens: int,
                 received: Optional[list] = None) -> tuple[list[int], list[TileSplit]]:
    """Tokens each tile (item) keeps, and each image's :class:`TileSplit` (None for a one-tile image)."""
    if len(pixel_values) != len(items):
        raise ValueError(f"pixel_values holds {len(pixel_values)} tiles but the prompt's placeholders make "
                         f"{len(items)} tiles of {tile_tokens} tokens")
    budgets, splits = [0] * len(items), []
    for tiles in images_of(items):
        if len(tiles) == 1:
            budgets[tiles[0]] = min(budget, tile_tokens)
            splits.append(None)
            continue
        *grid, thumbnail = tiles
        rows, cols = tile_layout(pixel_values[grid[0]:grid[-1] + 1], pixel_values[thumbnail])
        scores = thumbnail_scores(items[thumbnail].features, None if received is None else received[thumbnail])
        split = split_image(budget, tile_tokens, rows, cols, scores)
        for tile, kept in zip(grid, split.tile_budgets):
            budgets[tile] = kept
        budgets[thumbnail] = split.thumbnail_kept
        splits.append(split)
    return budgets, splits


__all__ = ["TileSplit", "images_of", "split_image", "thumbnail_scores", "tile_budgets", "tile_layout"]
