"""What the InternVL paths share: which models, a tile's tokens, the cost, the report.

InternVL (transformers' own format, ``InternVLForConditionalGeneration``) cuts each image into dynamic tiles of the
tower's size (a rows x cols grid fitted to its aspect ratio) and, when there are several, appends a thumbnail of
the whole image; ``pixel_values`` holds every tile of every image, ``[tiles, 3, side, side]``. The tower encodes
each tile on its own (its CLS token dropped), pixel shuffle folds each 2 x 2 block of patches into one token, and
the prompt holds each image as ``<img>``, ``image_seq_length`` placeholders per tile (tile after tile, the
thumbnail last), ``</img>``: a tile gives ``n`` tokens in raster order over its square grid, the same for every
tile. The prompt does not say how an image's tiles are laid out (2 x 3 and 3 x 2 give the same count).

vtr's unit is the *tile* (the thumbnail is one too): each keeps ``min(budget, n)`` tokens, at the start of its own
run of placeholders, so an image's tiles stay in order.

Imports no other module of this package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import nn

from vtr.budget.cost import EncoderCost

from ..vlm.language import language_cost
from ..vlm.report import VlmReport

WHERE = "before the language model (after the pixel shuffle and projector, per tile)"
VISION_ARGUMENTS = ("pixel_values",)


def internvl_classes() -> tuple:
    """The ``...ForConditionalGeneration`` classes vtr supports (those this transformers has)."""
    try:
        from transformers import InternVLForConditionalGeneration
    except ImportError:   # transformers is optional for vtr; older ones lack InternVL
        return ()
    return (InternVLForConditionalGeneration,)


def tile_tokens(model: nn.Module) -> int:
    """Visual tokens of every tile (after the pixel shuffle)."""
    vision = model.config.vision_config
    side = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    return int((side // patch) ** 2 * model.config.downsample_ratio ** 2)


def tile_grid(model: nn.Module) -> tuple[int, int, int]:
    """(frames, rows, cols) of a tile's tokens: a square grid, in raster order."""
    side = math.isqrt(tile_tokens(model))
    return (1, side, side)


def tile_side(model: nn.Module) -> int:
    """The side in pixels of a tile (the tower's input)."""
    size = model.config.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    """Language-model MACs of one tile's visual tokens, per layer (no CLS feature)."""
    return language_cost(model, tile_tokens(model), 0, has_cls=False)


@dataclass
class InternVLReport(VlmReport):
    """What the last InternVL call really kept: a :class:`~vtr.adapters.vlm.report.VlmReport` whose images are the
    call's tiles (each image's tiles, then its thumbnail), each with its own count."""

    where: str = WHERE
    tiles: Optional[list] = None   # split="thumbnail": per image, how its budget went (internvl.tiles.TileSplit)


__all__ = ["InternVLReport", "VISION_ARGUMENTS", "WHERE", "cost", "internvl_classes", "tile_grid", "tile_side",
           "tile_tokens"]
