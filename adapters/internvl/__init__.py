"""Hugging Face InternVL adapter (transformers' own format): fewer visual tokens reach (or go through) the language
model; ``generate()`` unchanged.

``vtr.patch(model, method, budget=B)`` keeps ``min(B, n)`` tokens of each *tile* (an image's dynamic tiles and its
thumbnail; ``n`` tokens each after the pixel shuffle), on the projector's output before the language model
(``before_lm``), each tile's in its own run of placeholders. ``split="thumbnail"`` makes ``budget=B`` an image's
instead, split over its thumbnail and its tiles by the thumbnail, GlobalCom²-style as on LLaVA-NeXT (``tiles``:
the tile grid, which the prompt does not record, is read from the pixels).
``layers=[K]`` (or ``[K1, K2, ...]``) prunes inside the language model instead, FastV-style, as on LLaVA
(``in_llm``): each tile keeps ``min(B, n)`` after the last stage. ``pool`` takes ``factor=`` and pools each tile's
grid.

The package: this front imports ``before_lm``, ``in_llm``, ``bench`` and ``received``; they import ``common``
(``before_lm`` also ``received`` and ``tiles``).

Limits: ``forward()`` with pixel values returns logits over the compacted prompt (``vtr.report(model).kept_positions``
maps them back) and refuses ``position_ids``; prompts come as ``input_ids``; ``metric='x'`` only. The report's
images are the tiles.
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from vtr.budget.visual import VisualPlan
from vtr.budget.schedule import Schedule
from vtr.core.plan import Reduction
from vtr.core.signals import Need
from vtr.reducers.base import Reducer

from ..errors import UnsupportedModelError
from ..vlm.front import BeforeOrInLmAdapter, ReducingBeforeOrInLm
from . import before_lm, bench, in_llm, received
from .common import InternVLReport, cost, internvl_classes, tile_side, tile_tokens

SUPPORTED = "InternVLForConditionalGeneration (InternVL, transformers' format)"
SPLITS = ("thumbnail",)


@dataclass(frozen=True)
class InternVLPlan(VisualPlan):
    """The typed settings of a patched InternVL: a :class:`VisualPlan` and ``split`` (None: ``budget`` per tile;
    ``"thumbnail"``: per image, split over its tiles by its thumbnail)."""

    split: Optional[str] = None


class ReducingInternVL(ReducingBeforeOrInLm):
    """Mixed in before the model's own class: ``forward`` and ``generate`` take the path chosen at patch time."""

    _vtr: Reduction
    before_lm = before_lm


class InternVL(BeforeOrInLmAdapter):
    """transformers ``InternVLForConditionalGeneration``: ``budget=`` per tile, or per image with
    ``split="thumbnail"``."""

    name = "internvl"
    amounts = (*BeforeOrInLmAdapter.amounts, "split")
    label, unit = "InternVL", "tile"
    reducing, received, bench, visuals = ReducingInternVL, received, bench, in_llm.InternVLVisuals
    family_cost = staticmethod(cost)

    def matches(self, model: nn.Module) -> bool:
        """Any InternVL model of transformers (bare ones too, so that they get a clear error)."""
        return any(cls.__module__.startswith("transformers.models.internvl.") for cls in type(model).__mro__)

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        if not isinstance(model, internvl_classes()):
            raise UnsupportedModelError(f"vtr's InternVL adapter supports transformers' {SUPPORTED}; got {kind}, "
                                        "which is not supported (for a bare InternVLModel, patch the "
                                        "InternVLForConditionalGeneration that holds it; the original remote-code "
                                        "InternVL checkpoints need converting to transformers' format)")

    def missing_signals(self, model: nn.Module, stage: str) -> dict:
        """InternViT has a [CLS] token: its row at the feature layer is given (``received``), not the attention each
        token receives; neither where the features come from no single attention layer."""
        missing = {Need.ATTENTION_RECEIVED: "InternViT has a [CLS] token: its attention row is given instead"}
        if received.feature_attention(model) is None:
            missing[Need.CLS_ATTENTION] = ("the features are not one attention layer's patches (vision_feature_layer "
                                           "selects the embeddings or several layers, or the [CLS] token is kept)")
        return missing

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """One tile (the analytic counts are per tile)."""
        return (model.config.vision_config.num_channels, tile_side(model), tile_side(model))

    def reference_tokens(self, model: nn.Module) -> int:
        return tile_tokens(model)

    def plan(self, layers=None, budget=None, frames: Optional[str] = None, temporal: Optional[float] = None,
             split: Optional[str] = None) -> InternVLPlan:
        base = VisualPlan.given(budget=budget, layers=layers, frames=frames, temporal=temporal)
        return InternVLPlan(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, split=split)

    def make_schedule(self, model: nn.Module, reducer: Reducer, *, r=None, keep=None, flops=None, layers=None,
                      metric: str = "x", budget=None, frames: Optional[str] = None, temporal: Optional[float] = None,
                      split: Optional[str] = None) -> Schedule:
        """``budget=`` (visual tokens kept per tile; with ``split="thumbnail"`` per image) as reduction steps on one
        tile's tokens."""
        self.refuse_amounts(r, keep, flops)
        if frames is not None or temporal is not None:
            raise ValueError("the InternVL adapter takes images only: leave out frames= and temporal=")
        if split is not None:
            _check_split(reducer, split, layers, budget)
        return self.schedule(model, reducer, self.plan(layers=layers, budget=budget, split=split))


def _check_split(reducer: Reducer, split, layers, budget) -> None:
    """``split=`` refused where the thumbnail cannot split an image's budget exactly, at patch time."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))} (an image's budget split over its "
                         f"tiles by its thumbnail) or left out (budget per tile), got {split!r}")
    if layers is not None:
        raise ValueError("split='thumbnail' splits an image's budget before the language model: leave out layers=")
    if type(reducer).fixed_amounts is not Reducer.fixed_amounts or reducer.fixed_count:
        raise ValueError(f"method {reducer.name!r} sets its own token count from its options, but split='thumbnail' "
                         "gives each tile its own share of the image's budget: choose a method that takes a budget")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
        raise ValueError(f"with split='thumbnail' budget must be an int >= 2 (visual tokens kept per image: at least "
                         f"one for its thumbnail and one for its tiles), got {budget!r}")


__all__: Sequence[str] = ["InternVL", "InternVLPlan", "InternVLReport", "ReducingInternVL"]
