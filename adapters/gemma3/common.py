"""What the Gemma 3 paths share: which models, the token types, the cost, the report.

Gemma 3 (transformers ``Gemma3ForConditionalGeneration``) encodes each image (each pan-and-scan crop too) with
SigLIP and average-pools the patch grid to a fixed ``mm_tokens_per_image`` (256 on the released models: 16 x 16),
which the language model reads at the ``image_token_id`` placeholders of ``<start_of_image> ... <end_of_image>``.
Its mask lets the tokens of one image attend to each other both ways (``token_type_ids`` 1 marks them; a run of
image tokens is one image), text causally.

Imports no other module of this package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.budget.cost import EncoderCost

from ..vlm.language import language_cost
from ..vlm.report import VlmReport

WHERE = "before the language model (after the projector's pooling, per image)"
VISION_ARGUMENTS = ("pixel_values",)


def gemma3_classes() -> tuple:
    """The ``...ForConditionalGeneration`` classes vtr supports (those this transformers has)."""
    try:
        from transformers import Gemma3ForConditionalGeneration
    except ImportError:   # transformers is optional for vtr; older ones lack Gemma 3
        return ()
    return (Gemma3ForConditionalGeneration,)


def image_tokens(model: nn.Module) -> int:
    """Visual tokens of every image (the projector pools each to this many)."""
    return int(model.config.mm_tokens_per_image)


def image_grid(model: nn.Module) -> tuple[int, int, int]:
    """(frames, rows, cols) of an image's pooled tokens: a square grid, in raster order."""
    side = math.isqrt(image_tokens(model))
    return (1, side, side)


def cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    """Language-model MACs of one image's visual tokens, per layer (no CLS feature)."""
    return language_cost(model, image_tokens(model), 0, has_cls=False)


def token_types(input_ids: Tensor, token_type_ids: Optional[Tensor], image_token_id: int) -> Tensor:
    """``token_type_ids`` (1 image, 0 text): the caller's, checked against the placeholders, or derived from
    ``input_ids`` when the call has none (as the processor builds them). The compacted prompt's are gathered from
    them, so each image's kept tokens are again one run of type 1: the mask Gemma 3 builds from them lets them
    attend to each other both ways, as the whole image's did."""
    expected = (input_ids == image_token_id).long()
    if token_type_ids is None:
        return expected
    if tuple(token_type_ids.shape) != tuple(input_ids.shape) or not torch.equal(token_type_ids.long(), expected):
        raise ValueError("token_type_ids must mark the image tokens 1 and every other token 0 (as the processor "
                         f"builds it), with the shape of input_ids {tuple(input_ids.shape)}; or leave it out and vtr "
                         "derives it from input_ids")
    return token_type_ids


@dataclass
class Gemma3Report(VlmReport):
    """What the last Gemma 3 call really kept (a :class:`~vtr.adapters.vlm.report.VlmReport`)."""

    where: str = WHERE


__all__ = ["Gemma3Report", "VISION_ARGUMENTS", "WHERE", "cost", "gemma3_classes", "image_grid", "image_tokens",
           "token_types"]
