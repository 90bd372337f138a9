"""In-LLM pruning on LLaVA (``layers=[K]`` or ``[K1, K2, ...]``): the shared machinery of
``vtr.adapters.vlm.in_llm``, told what a LLaVA prompt looks like (LLaVA-OneVision / NeXT-Video:
``video.VideoVisuals``).

LLaVA-1.5: every image has the model's own count (its square patch grid). LLaVA-NeXT: each image's
count is the length of its features as the model's own ``get_image_features`` gives them (generate()
pre-encodes the images and passes them to the forward), or, for a direct forward with ``pixel_values``,
what the model's own packing gives an image of its ``image_sizes`` (``common.layout``); its packed
base, crops and newlines are no grid. Nothing is split by crops: the last token's attention ranks
every token of the image, and newline tokens are ordinary tokens here (one may be dropped or merged
like any other).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.core.plan import Reduction

from ..vlm import in_llm
from vtr.budget.visual import image_budgets, stage_budgets, stage_layers  # noqa: F401 (LLaVA's in-LLM API)

from ..vlm.in_llm import expected_flops, forward, stages_of, uninstall  # noqa: F401 (LLaVA's in-LLM API)
from ..vlm.visuals import Item, Visuals, split_placeholders
from ..vlm.run import VlmRun
from .common import LlavaReport, check_image_sizes, image_tokens, is_next, layout


class LlavaVisuals(Visuals):
    """LLaVA's prompts: ``image_token_id`` placeholders, one image after another."""

    report_kind = LlavaReport

    def tokens(self, model: nn.Module) -> tuple[int, int]:
        return image_tokens(model)

    def placeholder(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        return input_ids == model.config.image_token_id

    def items(self, model: nn.Module, input_ids: Tensor, arguments: dict, run: VlmRun) -> list[Item]:
        placeholder = self.placeholder(model, input_ids)
        if is_next(model):
            images = (arguments.get("mm_encoder_outputs") or {}).get("image")
            counts = _next_image_counts(model, None if images is None else images.pooler_output,
                                        arguments.get("image_sizes"))
            return split_placeholders(placeholder, counts)
        per_image, protected = image_tokens(model)
        side = math.isqrt(per_image - protected)
        grid = (side, side) if side * side == per_image - protected else None
        count = int(placeholder.sum()) // per_image
        return split_placeholders(placeholder, [per_image] * count, [grid] * count)

    def check_generate(self, model: nn.Module, kwargs: dict) -> None:
        if is_next(model) and kwargs.get("pixel_values") is not None:
            _next_image_counts(model, None, kwargs.get("image_sizes"))     # needs image_sizes ...
            check_image_sizes(kwargs["pixel_values"], kwargs["image_sizes"])  # ... one per image


def install(model: nn.Module, reduction: Reduction, visuals: Optional[Visuals] = None) -> None:
    """Stages and hooks on ``model``; ``visuals``: what its prompts look like (default LLaVA's)."""
    in_llm.install(model, reduction, visuals or LlavaVisuals())


def check_generate(model: nn.Module, kwargs: dict) -> None:
    in_llm.check_generate(model, kwargs)


def _next_image_counts(model: nn.Module, image_features: Optional[list], image_sizes) -> list[int]:
    """Visual tokens of each LLaVA-NeXT image: its pre-encoded features' length, else its size's packing."""
    if image_features is not None:
        return [len(features) for features in image_features]
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes ([images, 2] height and width of each image, as the "
                         "processor returns them) with pixel_values")
    return [layout(model, size).num_tokens for size in torch.as_tensor(image_sizes).view(-1, 2).tolist()]
