"""What the Qwen-VL paths share: which models, the images and videos of a call, M-RoPE positions, costs, the report.

Qwen2-VL and Qwen2.5-VL (transformers) share everything vtr relies on: the vision tower's 2x2 patch
merger gives each image ``t x (h/2) x (w/2)`` tokens in raster order (``image_grid_thw`` gives t, h, w
in patches), ``get_image_features`` / ``get_video_features`` return them per image / video, and the
language model reads them at the ``image_token_id`` / ``video_token_id`` placeholders of the prompt,
with 3-D (temporal, height, width) rotary positions from ``get_rope_index``.

Qwen3-VL adds what vtr keeps as well: ``get_image_features`` / ``get_video_features`` also return
``deepstack_features`` (per tower level, per image), and its prompts give each temporal patch of a video its own
``<t seconds> <vision_start> ... <vision_end>`` (:func:`timestamped_frames`), which its ``get_rope_index`` reads.

Imports no other module of this package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.budget.cost import EncoderCost

from ..vlm.items import Visual, split_items
from ..vlm.language import language_cost
from ..vlm.report import VlmReport

WHERE = "before the language model (after the vision merger, per image or video)"
REFERENCE_SIDE = 16    # expected_flops / expected_tokens: 16 x 16 merged tokens (448 px at patch 14, 512 at 16)
VISION_ARGUMENTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def qwen_classes() -> tuple:
    """The ``...ForConditionalGeneration`` classes vtr supports (those this transformers has)."""
    classes = []
    try:
        from transformers import Qwen3VLForConditionalGeneration
        classes.append(Qwen3VLForConditionalGeneration)
    except ImportError:  # transformers before Qwen3-VL
        pass
    try:
        from transformers import Qwen2_5_VLForConditionalGeneration
        classes.append(Qwen2_5_VLForConditionalGeneration)
    except ImportError:  # transformers is optional for vtr; older ones lack Qwen2.5-VL
        pass
    try:
        from transformers import Qwen2VLForConditionalGeneration
        classes.append(Qwen2VLForConditionalGeneration)
    except ImportError:
        pass
    return tuple(classes)


def timestamped_frames(model: nn.Module) -> bool:
    """Qwen3-VL's prompts give each temporal patch of a video its own ``<t seconds> <vision_start> ... <vision_end>``
    (its processor's layout, which its ``get_rope_index`` reads); Qwen2/2.5-VL put a video's tokens in one run."""
    return getattr(model.config, "model_type", "") == "qwen3_vl"


def merge_size(model: nn.Module) -> int:
    return int(model.config.vision_config.spatial_merge_size)


def reference_tokens(model: nn.Module) -> int:
    """Visual tokens of the reference image the analytic counts use (any size works at run time)."""
    return REFERENCE_SIDE * REFERENCE_SIDE


def cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    """Language-model MACs of the reference image's visual tokens, per layer (no CLS feature: none exists)."""
    return language_cost(model, reference_tokens(model), 0, has_cls=False)


# -- the images and videos of one call ------------------------------------------------------------------

def visuals(features: list[Tensor], grid_thw: Tensor, placeholder: Tensor, kind: str, merge: int) -> list[Visual]:
    """The call's images (or videos) from their features, ``*_grid_thw`` (in patches) and placeholders ``[B, L]``."""
    grids = [(t, h // merge, w // merge) for t, h, w in grid_thw.tolist()]
    return split_items(features, grids, placeholder, kind)


def token_types(input_ids: Tensor, mm_token_type_ids: Optional[Tensor], image_token_id: int,
                video_token_id: int) -> Tensor:
    """``mm_token_type_ids`` (0 text, 1 image, 2 video): the caller's, checked against the placeholders, or,
    when the call has none, derived from ``input_ids`` by the processor's rule.

    vtr gives each kept token the M-RoPE position the model's own ``get_rope_index`` computes from these
    ids. Without them the unpatched model behaves differently by version: Qwen2-VL refuses the call, and
    Qwen2.5-VL (transformers 5.x) skips ``get_rope_index`` and runs the whole prompt, images included, on
    1-D text positions, which is not how the model was trained. The patched model uses the ids the
    processor would have returned, so its positions are the model's real 3-D ones either way.
    """
    expected = (input_ids == image_token_id).long() + 2 * (input_ids == video_token_id).long()
    if mm_token_type_ids is None:
        return expected
    if tuple(mm_token_type_ids.shape) != tuple(input_ids.shape) or not torch.equal(mm_token_type_ids.long(), expected):
        raise ValueError("mm_token_type_ids must mark the image tokens 1, the video tokens 2 and every other token 0 "
                         f"(as the processor builds it), with the shape of input_ids {tuple(input_ids.shape)}; "
                         "or leave it out and vtr derives it from input_ids")
    return mm_token_type_ids


def prompt_positions(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor,
                     image_grid_thw: Optional[Tensor], video_grid_thw: Optional[Tensor],
                     second_per_grid_ts: Optional[Tensor]) -> Tensor:
    """``[3, B, L]`` (temporal, height, width) rotary positions of the caller's whole prompt, by the model's
    own ``get_rope_index`` (0 at padding)."""
    extra = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
    positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                              video_grid_thw=video_grid_thw, attention_mask=attention_mask, **extra)
    return positions


# -- the report ----------------------------------------------------------------------------------------

@dataclass
class QwenVLReport(VlmReport):
    """What the last Qwen-VL call really kept: a :class:`~vtr.adapters.vlm.report.VlmReport` whose images are the
    call's images, then its videos (``kinds``, ``grids``, ``frame_tokens``), each with its own count.

    visual_positions: per image or video, ``[3, K]`` (temporal, height, width) rotary position of each
        token the language model saw, in the order it saw them: a kept token's own, a merged token its
        representative's (the first original token it carries, see ``before_lm``).
    tower_layer / tower_macs / tower_macs_unreduced: reduced inside the vision tower (``tower_layer=``) only: the
        block after which units were dropped, and the multiply-accumulates of the call's tower runs (all its images
        and videos) as they ran and unreduced (what a FLOP counter sees: patch embedding, blocks, mergers; see
        ``tower.tower_macs``); None otherwise (the tower then runs unreduced).
    """

    where: str = WHERE
    visual_positions: list = field(default_factory=list)
    tower_layer: Optional[int] = None
    tower_macs: Optional[float] = None
    tower_macs_unreduced: Optional[float] = None

    @property
    def tower_flops_saved(self) -> Optional[float]:
        """Fraction of the call's vision-tower MACs that reducing inside the tower removed (None: it did not)."""
        if self.tower_macs is None:
            return None
        return 1.0 - self.tower_macs / self.tower_macs_unreduced


def where_in_tower(layer: int) -> str:
    return f"in the vision tower after block {layer} (whole 2x2 merge units, per image or video)"


__all__ = ["QwenVLReport", "Visual", "where_in_tower", "token_types", "cost", "merge_size", "prompt_positions",
           "qwen_classes", "reference_tokens", "timestamped_frames", "visuals"]
