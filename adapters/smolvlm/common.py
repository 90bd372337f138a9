"""What the SmolVLM / Idefics3 paths share: which models, a tile's tokens, the cost, the report.

SmolVLM and Idefics3 (transformers) split each image into tiles of the tower's size (rows x cols of them, then
the whole image downscaled as a global view), and the processor writes each tile into the prompt as
``<fake_token_around_image> <row_r_col_c> <image>*n`` (the global view after ``<global-img>``). The tower encodes
every tile on its own; the connector's pixel shuffle folds each ``s x s`` block of patches into one token, so
a tile gives ``n = (side / patch / s) ** 2`` tokens in raster order over its ``(side / patch / s)`` square grid,
the same count for every tile. ``get_image_features`` returns them per prompt row (its tiles concatenated).

vtr's unit is the *tile* (the global view is one too): each keeps ``min(budget, n)`` tokens, in its own span of
placeholders, so the row/column markers still name the tokens after them.

Imports no other module of this package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from vtr.budget.cost import EncoderCost

from ..vlm.language import language_cost
from ..vlm.report import VlmReport

WHERE = "before the language model (after the connector's pixel shuffle, per tile)"
VISION_ARGUMENTS = ("pixel_values", "pixel_attention_mask")


def smolvlm_classes() -> tuple:
    """The ``...ForConditionalGeneration`` classes vtr supports (those this transformers has)."""
    classes = []
    try:
        from transformers import SmolVLMForConditionalGeneration
        classes.append(SmolVLMForConditionalGeneration)
    except ImportError:   # transformers is optional for vtr; older ones lack SmolVLM
        pass
    try:
        from transformers import Idefics3ForConditionalGeneration
        classes.append(Idefics3ForConditionalGeneration)
    except ImportError:
        pass
    return tuple(classes)


def tile_tokens(model: nn.Module) -> int:
    """Visual tokens of every tile (after the pixel shuffle)."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor ** 2


def tile_grid(model: nn.Module) -> tuple[int, int, int]:
    """(frames, rows, cols) of a tile's tokens: a square grid, in raster order."""
    side = math.isqrt(tile_tokens(model))
    return (1, side, side)


def cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    """Language-model MACs of one tile's visual tokens, per layer (no CLS feature)."""
    return language_cost(model, tile_tokens(model), 0, has_cls=False)


@dataclass
class SmolVLMReport(VlmReport):
    """What the last SmolVLM / Idefics3 call really kept: a :class:`~vtr.adapters.vlm.report.VlmReport` whose
    images are the call's tiles (each image's tiles, then its global view), each with its own count."""

    where: str = WHERE


__all__ = ["SmolVLMReport", "VISION_ARGUMENTS", "WHERE", "cost", "smolvlm_classes", "tile_grid", "tile_tokens"]
