"""What every LLaVA path shares: image token counts, costs, the report; the rest comes from ``vtr.adapters.vlm``
(the per-call run, the language model's cost, reduction steps, prompt compaction), re-exported here.

Imports no other module of this package: ``before_lm``, ``anyres`` and ``in_llm`` build on it, and the
front (``__init__``) on all of them.

Image token counts: LLaVA-1.5 gives every image the same count (the vision tower's patch grid);
LLaVA-NeXT packs each image by its own size (:func:`layout`, read from the model's own packing), so the
count is per image and the settings use the most one image can have (:func:`largest_image_tokens`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.budget.cost import EncoderCost
from vtr.budget.visual import reduction_steps, step_counts
from vtr.core.plan import Reduction
from vtr.core.signals import Need

from ..errors import UnsupportedModelError
from ..vlm import report as vlm_report
from ..vlm.language import language_cost, prefill_macs
from ..vlm.prompt import compact_prompt, kept_columns
from ..vlm.reduce import carried, padded, reduce_group
from ..vlm.report import VlmReport
from ..vlm.run import VlmRun, opened

WHERE = "before the language model (projector output, per image)"
VISION_KEYS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


# -- which model -------------------------------------------------------------------------------------

def llava_classes() -> tuple:
    try:
        from transformers import LlavaForConditionalGeneration, LlavaModel
    except ImportError:  # transformers is optional for vtr
        return ()
    return LlavaForConditionalGeneration, LlavaModel


def is_next(model: nn.Module) -> bool:
    """``model`` is LLaVA-NeXT (AnyRes: a thumbnail plus crops, a token count per image)."""
    try:
        from transformers import LlavaNextForConditionalGeneration
    except ImportError:  # transformers is optional for vtr
        return False
    return isinstance(model, LlavaNextForConditionalGeneration)


# -- LLaVA-NeXT packing: where each of an image's features comes from -------------------------------

@dataclass(frozen=True)
class AnyresLayout:
    """Where each of one LLaVA-NeXT image's packed features comes from.

    source: ``[N]`` per packed feature ``part * part_tokens + index in the part``, -1 for a newline.
        Part 0 is the base image, part ``1 + c`` crop ``c`` (crops in row-major order).
    rows, cols: the unpadded crop map (one newline closes each row).
    """

    image_size: tuple[int, int]
    source: Tensor
    side: int                 # the base image and every crop are side x side token grids
    num_crops: int
    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        return self.source.numel()

    @property
    def part_tokens(self) -> int:
        return self.side * self.side

    @property
    def part(self) -> Tensor:
        """``[N]`` part of each packed feature, -1 for newlines."""
        return torch.where(self.source >= 0, self.source // self.part_tokens, -1)

    def positions(self, part: int) -> Tensor:
        """Packed positions of ``part``'s tokens (row-major within its region)."""
        return (self.part == part).nonzero()[:, 0]

    def map_position(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(row, col) in the unpadded crop map of packed crop-token positions."""
        offset = positions - self.part_tokens
        return offset // (self.cols + 1), offset % (self.cols + 1)

    def reduces(self, budget: Optional[int]) -> bool:
        """Whether ``budget`` makes this image's thumbnail and crop tokens be reduced (not only newlines dropped)."""
        return budget is not None and budget < self.num_tokens and budget <= self.num_tokens - self.rows

    def crop_tokens(self) -> list[int]:
        counts = torch.bincount(self.part[self.part > 0] - 1, minlength=self.num_crops)
        return counts.tolist()

    def grid(self, part: int) -> tuple[int, int]:
        """(rows, cols) of ``part``'s region: a full grid for the base, a cut one for a crop."""
        if part == 0:
            return self.side, self.side
        rows, cols = self.map_position(self.positions(part))
        return rows.unique().numel(), cols.unique().numel()


def layout(model: nn.Module, image_size) -> AnyresLayout:
    """The packed layout of an image of ``image_size`` (height, width), from the model's own packing."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    image_size = tuple(int(v) for v in image_size)
    side = config.vision_config.image_size // config.vision_config.patch_size
    num_parts = image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    ids = torch.arange(num_parts * side * side, dtype=torch.float64).view(num_parts, side * side, 1)
    newline = torch.tensor([-1.0], dtype=torch.float64)
    packed, _ = model.model.pack_image_features([ids], [list(image_size)], "default", image_newline=newline)
    source = packed[0][:, 0].long()
    rows = int((source < 0).sum())     # 0 for an image so thin that unpadding leaves no row
    cols = (source.numel() - side * side - rows) // rows if rows else 0
    return AnyresLayout(image_size, source, side, num_parts - 1, rows, cols)


_LARGEST: dict = {}   # largest_image_tokens per (packing, pinpoints, image size, patch size): asked at every call


def largest_image_tokens(model: nn.Module) -> int:
    """Most tokens one LLaVA-NeXT image can have: an image of a pinpoint's own size fills its grid."""
    config = model.config
    key = (type(model.model), repr(config.image_grid_pinpoints), config.vision_config.image_size,
           config.vision_config.patch_size)
    if key not in _LARGEST:
        _LARGEST[key] = max(layout(model, pinpoint).num_tokens for pinpoint in config.image_grid_pinpoints)
    return _LARGEST[key]


def check_image_sizes(pixel_values: Tensor, image_sizes) -> None:
    """LLaVA-NeXT's ``image_sizes`` must give one (height, width) per image, checked before the tower runs."""
    sizes = torch.as_tensor(image_sizes)
    if sizes.dim() != 2 or sizes.shape[1] != 2:
        raise ValueError(f"image_sizes must be [images, 2] (height, width of each image), got shape "
                         f"{tuple(sizes.shape)}")
    if pixel_values.dim() == 5 and sizes.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"image_sizes must give one (height, width) per image: pixel_values has "
                         f"{pixel_values.shape[0]} images, got {sizes.shape[0]} sizes")


def image_tokens(model: nn.Module) -> tuple[int, int]:
    """(visual tokens per image, protected leading tokens) at the model's own image size.

    With the 'full' strategy the first feature is the vision tower's CLS token: it is protected.
    LLaVA-NeXT: the most tokens one image can have (its count depends on the image's size).
    """
    if is_next(model):
        return largest_image_tokens(model), 0
    config = model.config
    vision = config.vision_config
    protected = 1 if config.vision_feature_select_strategy == "full" else 0
    if hasattr(vision, "image_size") and hasattr(vision, "patch_size"):
        return (vision.image_size // vision.patch_size) ** 2 + protected, protected
    return int(config.image_seq_length), protected


def feature_attention(model: nn.Module, required: bool = True) -> Optional[nn.Module]:
    """The attention module of the vision layer that produces ``hidden_states[vision_feature_layer]``;
    None where there is none and it is not ``required``."""
    layer_index = model.config.vision_feature_layer
    layers = getattr(getattr(model.model.vision_tower, "encoder", None), "layers", None)
    problem = None
    if not isinstance(layer_index, int) or layers is None:
        problem = "cls_attention needs a CLIP-style vision tower and an int vision_feature_layer"
    elif layer_index % (len(layers) + 1) == 0:
        problem = "vision_feature_layer selects the embeddings: there is no attention to read"
    if problem is not None:
        if required:
            raise UnsupportedModelError(problem)
        return None
    attention = layers[layer_index % (len(layers) + 1) - 1].self_attn
    if not all(hasattr(attention, key) for key in ("q_proj", "k_proj", "num_heads", "scale")):
        if required:
            raise UnsupportedModelError(f"cls_attention: {type(attention).__name__} has no CLIP-style q_proj/k_proj")
        return None
    return attention


# -- costs ---------------------------------------------------------------------------------------------

def cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    """Language-model MACs of one image's visual tokens (what the reduction saves), per layer."""
    return language_cost(model, *image_tokens(model))


def decision_macs(model: nn.Module, reduction: Reduction, tokens: list[int]) -> float:
    """MACs of the reducer's own decisions along one token set's steps (``tokens`` as reduce_group gives),
    before the language model: a CLS-attention row is the vision tower's, at the tower's width."""
    attention = feature_attention(model, required=False) if Need.CLS_ATTENTION in reduction.reducer.needs else None
    image_cost = replace(cost(model, reduction.metric), has_cls=attention is not None,
                         attn_dim=0 if attention is None else attention.q_proj.out_features)
    return float(sum(reduction.reducer.extra_macs(n, image_cost, m) for n, m in zip(tokens[:-1], tokens[1:]) if m < n))


# -- reducing a set of tokens --------------------------------------------------------------------------

@dataclass
class ReducedImages:
    """Each image's reduced features and what they carry, for the compacted prompt and the report."""

    features: list[Tensor]        # [K_i, D] per image, in the order the language model reads them
    assignment: list[Tensor]      # [N_i] index of the output token carrying each original one, -1 dropped
    size: list[Tensor]            # [K_i] original tokens each output token stands for
    tokens: list[int]             # LlavaReport.tokens
    reducer_macs: float
    num_protected: int = 0
    grid: Optional[tuple] = None
    anyres: Optional[list] = None  # LLaVA-NeXT: per image, how the budget was split


# -- the report ----------------------------------------------------------------------------------------

@dataclass
class LlavaReport(VlmReport):
    """What the last LLaVA call really kept: a :class:`~vtr.adapters.vlm.report.VlmReport`, and for LLaVA-NeXT
    how each image's budget was split.

    anyres: LLaVA-NeXT only, per image an :class:`vtr.adapters.llava.anyres.AnyresSplit`: the tokens and
        budgets of its base image, its crops and its newline tokens. For LLaVA-NeXT ``tokens`` is
        [most tokens an image had, most an image kept], ``assignment`` is padded with -1 past an
        image's own token count, ``size`` with 0 past its kept count, and ``grid`` is None.
    """

    where: str = WHERE
    anyres: Optional[list] = None

    @property
    def crop_budgets(self) -> Optional[list[list[int]]]:
        """LLaVA-NeXT: per image, the tokens kept from each crop (row-major crop order)."""
        return None if self.anyres is None else [split.crop_budgets for split in self.anyres]


def text_only_report(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor],
                     where: str = WHERE) -> LlavaReport:
    """Report of a call without images: nothing to reduce, every row passes through untouched."""
    return vlm_report.text_only_report(model, input_ids, attention_mask, where, LlavaReport)


__all__ = ["AnyresLayout", "LlavaReport", "ReducedImages", "VlmRun", "carried", "compact_prompt", "cost",
           "decision_macs", "image_tokens", "kept_columns", "largest_image_tokens", "layout", "opened", "padded",
           "prefill_macs", "reduce_group", "reduction_steps", "step_counts", "text_only_report"]
