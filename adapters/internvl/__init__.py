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
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vtr.budget import visual
from vtr.budget.visual import VisualPlan
from vtr.budget.cost import EncoderCost
from vtr.budget.schedule import Schedule
from vtr.core.plan import Reduction
from vtr.core.signals import Need
from vtr.reducers.base import Reducer

from .. import steps
from ..base import restore_class, swap_class
from ..errors import UnsupportedModelError
from ..vlm import in_llm as pruning
from ..vlm import items
from ..vlm.front import ReducingBeforeOrInLm, VlmAdapter
from ..vlm.language import decoder
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


class InternVL(VlmAdapter):
    """transformers ``InternVLForConditionalGeneration``."""

    name = "internvl"
    amounts = (*VlmAdapter.amounts, "split")

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

    def cost(self, model: nn.Module, metric: str = "x") -> EncoderCost:
        return cost(model, metric)

    def blocks(self, model: nn.Module) -> nn.Module:
        """The language model's decoder layers: where the visual tokens cost."""
        return decoder(model).layers

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """One tile (the analytic counts are per tile)."""
        return (model.config.vision_config.num_channels, tile_side(model), tile_side(model))

    def default_input(self, model: nn.Module, batch: int = 1, device: Union[str, torch.device] = "cpu") -> Tensor:
        raise ValueError(f"cannot make an input for {type(model).__name__}: it takes a prompt (input_ids with image "
                         "tokens) as well as pixel_values; pass inputs=")

    def plan(self, layers=None, budget=None, frames: Optional[str] = None, temporal: Optional[float] = None,
             split: Optional[str] = None) -> InternVLPlan:
        base = VisualPlan.given(budget=budget, layers=layers, frames=frames, temporal=temporal)
        return InternVLPlan(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, split=split)

    def make_schedule(self, model: nn.Module, reducer: Reducer, *, r=None, keep=None, flops=None, layers=None,
                      metric: str = "x", budget: Optional[Union[int, Sequence[int]]] = None,
                      frames: Optional[str] = None, temporal: Optional[float] = None,
                      split: Optional[str] = None) -> Schedule:
        """``budget=`` (visual tokens kept per tile; with ``split="thumbnail"`` per image) as reduction steps on one
        tile's tokens."""
        others = [k for k, v in (("r", r), ("keep", keep), ("flops", flops)) if v is not None]
        if others:
            raise ValueError(f"the InternVL adapter takes budget= (visual tokens kept per tile), not "
                             f"{', '.join(o + '=' for o in others)}")
        if frames is not None or temporal is not None:
            raise ValueError("the InternVL adapter reduces images (tiles): leave out frames= and temporal=")
        if split is not None:
            _check_split(reducer, split, layers, budget)
        plan = self.plan(layers=layers, budget=budget, split=split)
        return visual.schedule(reducer, plan, num_tokens=tile_tokens(model), num_layers=len(decoder(model).layers),
                               any_size=True, family="InternVL")

    def expected_flops(self, model: nn.Module, reduction: Optional[Reduction]) -> tuple[float, float]:
        """(reduced, unreduced) language-model prefill MACs of one tile's visual tokens alone (no text), the
        reducer's own decisions included; the vision tower is the same either way."""
        stages = pruning.stages_of(model)
        if reduction is not None and stages is not None:
            return pruning.expected_flops(model, reduction, stages)
        return items.expected_flops(model, reduction, cost(model),
                                    0.0 if reduction is None else received.expected_macs(model, reduction))

    def patch(self, model: nn.Module, reduction: Reduction) -> None:
        reduction = steps.dropping_as_published(reduction)
        if reduction.metric != "x":
            raise ValueError("the InternVL adapter compares visual tokens by their features: use metric='x'")
        if reduction.visual.in_llm:
            pruning.install(model, reduction, in_llm.InternVLVisuals())
        received.install(model, reduction)
        model._vtr = reduction
        swap_class(model, ReducingInternVL)

    def benchmark_workload(self, model: nn.Module, *args) -> tuple[dict, int, str, dict]:
        return bench.workload(model, *args)

    def benchmark_prompt(self, model: nn.Module, inputs: dict, before: bool, timed):
        return bench.prompt(model, inputs, before, timed)

    def unpatch(self, model: nn.Module) -> None:
        pruning.uninstall(model)
        received.uninstall(model)
        restore_class(model)
        del model._vtr


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
