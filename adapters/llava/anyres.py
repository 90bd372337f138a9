"""LLaVA-NeXT (AnyRes): one exact budget per image, split over the thumbnail and the crops by the
thumbnail's attention.

transformers packs each image as the base image's (the thumbnail's) tokens, then the AnyRes crops
stitched into one feature map, unpadded to the image's aspect ratio, with the learned
``image_newline`` token after each row of that map. ``vtr.patch(model, method, budget=B)`` makes
the language model see exactly ``B`` tokens of each image (base + crops + kept newlines):

1. The base image gets a share of ``B - 1`` proportional to its share of the image's base and crop
   tokens (at least one token); the crops share the rest (at least one token).
2. The crops' share is split by the thumbnail ("thumbnail as commander", after GlobalCom²; budgets
   by early attention, after HiRED): a crop's weight is the CLS attention the base image pays to
   the base tokens covering the crop's region of the image (area-weighted), at the vision layer
   LLaVA reads. Proportional, largest-remainder rounding, capped at each crop's own tokens with the
   excess handed on (``vtr.reducers.drop.allocate``), so the shares sum to the total exactly. A
   crop cut by unpadding has fewer tokens; one unpadded away entirely has none and gets nothing.
   Without a usable CLS attention (a tower other than CLIP's, several feature layers) the crops
   share in proportion to their token counts.
3. The base and each crop are reduced by the patched method to their own budgets, each with its own
   signals: its own CLS attention row, its grid, the prompt row's query (the method's
   ``max_step`` may take several steps, as for LLaVA-1.5).
4. Newlines: a reduced image keeps only its final newline token, and it counts in ``B``. Once tokens
   are merged or dropped, the rows the other newlines closed no longer exist, so they would mark
   nothing; the final one still marks where the image ends and the text begins, as in every
   LLaVA-NeXT prompt. Reducers never see newline tokens, so none is ever merged.

The language model reads the base image's kept tokens, then the crops' in crop order, then the
final newline. An image with at most ``B`` tokens passes through untouched. When ``B`` leaves room
for every base and crop token but not for every newline, nothing is merged: the image keeps all
its base and crop tokens in their order and its last ``B - (base + crop tokens)`` newlines (its
rows are whole, so each kept newline still closes its row). An image so thin that unpadding
leaves no row of crops (aspect ratio beyond about 1:20) is its thumbnail alone, without a newline;
one that leaves rows but no columns has newlines only: either way the budget goes to the thumbnail.

The layout of an image (``common.layout``, shared with in-LLM pruning, which needs each image's
count) is read from the model's own ``pack_image_features`` run on position ids, so it follows
transformers' unpadding exactly. ``budget`` must lie in ``[MIN_BUDGET, most tokens an image can
have]`` (``common.largest_image_tokens``). Methods whose count is set by their own options
(``pool``) are refused.

This module is the budget split and the reduction of one image's parts; ``before_lm`` calls
:func:`reduce_images` for LLaVA-NeXT, and the front asks :func:`check`, :func:`check_reduction` and
:func:`expected_parts`. It imports only ``common`` (and the thumbnail's area weights, ``vtr.adapters.vlm.thumbnail``,
which InternVL's tiles share).

In-LLM pruning (``layers=[K]`` or ``[K1, K2, ...]``, ``in_llm.py``) works on
LLaVA-NeXT too, without any of the above: ``budget=B`` is the visual tokens each image keeps after
the last stage (an image with at most B keeps all; ``budget`` in ``[1, most tokens an image can
have]``), chosen by the last prompt token's attention over all the image's tokens (no split by
crops), and newline tokens are ordinary tokens there (kept, merged or dropped like any other).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.core.plan import Reduction
from vtr.core.state import TokenState
from vtr.reducers.base import Reducer
from vtr.budget.visual import split_budget

from ..errors import UnsupportedModelError
from ..vlm.thumbnail import grid_importance
from .common import AnyresLayout, ReducedImages, decision_macs, layout, reduce_group

MIN_BUDGET = 3   # one base token, one crop token and the final newline


def check(model: nn.Module) -> None:
    """What the AnyRes path relies on, refused up front with the reason."""
    config, kind = model.config, type(model).__name__
    if config.vision_feature_select_strategy != "default":
        raise UnsupportedModelError(
            f"{kind}: vision_feature_select_strategy={config.vision_feature_select_strategy!r}; vtr supports "
            "LLaVA-NeXT with 'default' only (with 'full' each crop's CLS feature does not fit the crop grid)")
    if not config.image_grid_pinpoints:
        raise UnsupportedModelError(f"{kind}.config.image_grid_pinpoints is empty: there is no AnyRes grid")
    if not all(hasattr(config.vision_config, key) for key in ("image_size", "patch_size")):
        raise UnsupportedModelError(f"{kind}: the vision config needs image_size and patch_size (the crop grid)")


def check_reduction(model: nn.Module, reduction: Reduction) -> None:
    """Refuse what LLaVA-NeXT cannot do exactly (at patch time, not at the first call)."""
    if type(reduction.reducer).fixed_amounts is not Reducer.fixed_amounts:
        raise ValueError(
            f"method {reduction.method!r} sets its own token count from its options, but a LLaVA-NeXT budget is "
            "exact per image (the crops' budgets differ): choose a method that takes a budget")


def crop_importance(geometry: AnyresLayout, base_attention: Tensor) -> Tensor:
    """``[num_crops]``: the thumbnail's attention mass over each crop's region of the image.

    The base image and the unpadded crop map both span the whole image; each base token's attention
    is spread over the map tokens its cell covers, by area, and summed per crop.
    """
    density = grid_importance(base_attention, geometry.rows, geometry.cols)   # [rows, cols] of the crop map
    crops = geometry.part > 0
    rows, cols = geometry.map_position(crops.nonzero()[:, 0])
    mass = torch.zeros(geometry.num_crops, dtype=torch.float64)
    return mass.index_add_(0, geometry.part[crops] - 1, density[rows, cols])


@dataclass
class AnyresSplit:
    """How one LLaVA-NeXT image's budget was spent (``vtr.report(model).anyres``, one per image).

    crop_tokens / crop_budgets: per crop (row-major crop order), its tokens after unpadding (0 when
    unpadded away) and how many it kept. crop_weights: the thumbnail attention mass over each
    crop's region that split the budget; None when the crops shared by token count (no CLS
    attention) or nothing was reduced.
    """

    image_size: tuple[int, int]
    base_tokens: int
    base_kept: int
    crop_tokens: list[int]
    crop_budgets: list[int]
    newline_tokens: int
    newlines_kept: int
    crop_weights: Optional[list[float]] = None

    @property
    def tokens_before(self) -> int:
        return self.base_tokens + sum(self.crop_tokens) + self.newline_tokens

    @property
    def tokens_after(self) -> int:
        return self.base_kept + sum(self.crop_budgets) + self.newlines_kept

    @property
    def passed_through(self) -> bool:
        """True when the image reached the language model untouched (it had at most ``budget`` tokens)."""
        return self.tokens_after == self.tokens_before


def reduce_images(model: nn.Module, reduction: Reduction, features: list[Tensor], attention: Optional[Tensor],
                  query: Optional[list], image_sizes, allocation: Optional[Tensor] = None,
                  keys: Optional[Tensor] = None) -> ReducedImages:
    """Reduce every image to the budget, image by image.

    ``attention``: ``[parts of all images, side * side]`` CLS attention rows of the base images and
    crops as the vision tower saw them (image after image), or None. ``allocation``: the same rows at
    the layer the method splits budgets by (HiRED's ``allocate_layer``), or None to split by ``attention``.
    ``keys``: ``[parts of all images, side * side, d]`` the feature layer's keys (head mean), or None.
    """
    sizes = torch.as_tensor(image_sizes).view(-1, 2).tolist()
    if len(sizes) != len(features):
        raise ValueError(f"image_sizes must give one (height, width) per image: {len(features)} images, "
                         f"got {len(sizes)} sizes")
    layouts = [layout(model, size) for size in sizes]
    parts = [g.num_crops + 1 for g in layouts]
    rows = [None] * len(layouts) if attention is None else attention.split(parts)
    splitting = rows if allocation is None else allocation.split(parts)
    part_keys = [None] * len(layouts) if keys is None else keys.split(parts)
    budget = reduction.visual.budget if reduction.reduces else None
    results = [reduce_image(model, reduction, x, geometry, budget, rows[i], None if query is None else query[i],
                            splitting[i], part_keys[i])
               for i, (x, geometry) in enumerate(zip(features, layouts))]
    splits = [r[3] for r in results]
    return ReducedImages(
        features=[r[0] for r in results], assignment=[r[1] for r in results], size=[r[2] for r in results],
        tokens=[max(s.tokens_before for s in splits), max(s.tokens_after for s in splits)],
        reducer_macs=sum(r[4] for r in results), anyres=splits)


def plan(geometry: AnyresLayout, budget: Optional[int], crop_weights: Optional[Tensor]) -> AnyresSplit:
    """How an image of this layout spends ``budget`` (None: nothing is reduced); crops share by
    ``crop_weights`` (None: by token count). See the module docstring for the rules."""
    crop_tokens = geometry.crop_tokens()
    split = AnyresSplit(geometry.image_size, geometry.part_tokens, geometry.part_tokens, crop_tokens,
                        list(crop_tokens), geometry.rows, geometry.rows)
    if budget is None or budget >= geometry.num_tokens:
        return split
    if not geometry.reduces(budget):    # whole rows: drop the first newlines only
        split.newlines_kept = budget - (geometry.num_tokens - geometry.rows)
        return split
    split.newlines_kept = min(1, geometry.rows)    # an image unpadded to no row has no newline at all
    available = budget - split.newlines_kept
    if sum(crop_tokens) == 0:
        split.base_kept, split.crop_budgets = available, [0] * len(crop_tokens)
        return split
    if crop_weights is not None:
        split.crop_weights = crop_weights.tolist()
    else:
        crop_weights = torch.tensor(crop_tokens, dtype=torch.float64)
    split.base_kept, split.crop_budgets = split_budget(available, geometry.part_tokens, crop_tokens, crop_weights)
    return split


def reduce_image(model: nn.Module, reduction: Reduction, x: Tensor, geometry: AnyresLayout, budget: Optional[int],
                 attention: Optional[Tensor], query: Optional[Tensor], allocation: Optional[Tensor] = None,
                 keys: Optional[Tensor] = None):
    """One image ``x [N, D]`` to ``budget`` tokens: (features, assignment [N], size, AnyresSplit, reducer MACs).

    The crops share the budget by the thumbnail's row of ``allocation`` (default: of ``attention``)."""
    allocation = attention if allocation is None else allocation
    if x.shape[0] != geometry.num_tokens:
        raise ValueError(f"an image of size {geometry.image_size} packs to {geometry.num_tokens} features, got "
                         f"{x.shape[0]}: image_sizes must match pixel_values")
    newline = geometry.source < 0
    reduces = geometry.reduces(budget)
    weights = crop_importance(geometry, allocation[0]) if reduces and allocation is not None else None
    split = plan(geometry, budget, weights)
    if not reduces:                 # untouched, or whole rows less their first newlines
        first_kept = geometry.rows - split.newlines_kept
        return _keep(x, ~newline | (newline.cumsum(0) > first_kept)) + (split, 0.0)

    parts, macs = [], 0.0   # (positions in the image, their reduction), joined in order
    for part, part_budget in enumerate([split.base_kept] + split.crop_budgets):
        if part_budget == 0:
            continue                                  # a crop given nothing (or unpadded away) is dropped
        positions = geometry.positions(part)
        within = geometry.source[positions] % geometry.part_tokens
        positions = positions.to(x.device)
        state, tokens = reduce_group(
            reduction, x[positions][None], part_budget,
            attention=None if attention is None else attention[part, within.to(attention.device)][None],
            query=query, grid=geometry.grid(part),
            keys=None if keys is None else keys[part, within.to(keys.device)][None])
        parts.append((positions, state))
        macs += decision_macs(model, reduction, tokens)
    if split.newlines_kept:                           # the final newline closes the image
        last = torch.tensor([geometry.num_tokens - 1], device=x.device)
        parts.append((last, TokenState.start(x[None, -1:])))
    image = TokenState.start(x[None]).joined(parts)
    return image.x[0], image.assignment[0], image.size[0], split, macs


def _keep(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Features, assignment and sizes of the tokens ``keep`` selects, in their order, unmerged."""
    keep = keep.to(x.device)
    assignment = torch.where(keep, keep.long().cumsum(0) - 1, -1)
    return x[keep], assignment, torch.ones(int(keep.sum()), device=x.device)


def expected_parts(model: nn.Module, budget: int) -> list[tuple[int, int]]:
    """(tokens, budget) of the base and each reduced crop of the largest image, crops split by token
    count (the thumbnail's attention is only known at run time); for ``vtr.expected_flops``."""
    geometry = max((layout(model, p) for p in model.config.image_grid_pinpoints), key=lambda g: g.num_tokens)
    split = plan(geometry, budget, None)
    parts = zip([split.base_tokens] + split.crop_tokens, [split.base_kept] + split.crop_budgets)
    return [(n, b) for n, b in parts if 0 < b < n]


__all__ = ["AnyresSplit", "MIN_BUDGET", "check", "check_reduction", "crop_importance", "expected_parts", "plan",
           "reduce_images"]
