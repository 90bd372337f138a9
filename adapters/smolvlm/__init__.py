"""Hugging Face SmolVLM and Idefics3 adapter: fewer visual tokens reach (or go through) the language model;
``generate()`` unchanged.

``vtr.patch(model, method, budget=B)`` keeps ``min(B, n)`` tokens of each *tile* (the processor's rows x cols
tiles of an image and its global view; ``n`` tokens each after the connector's pixel shuffle), on the connector's
output before the language model (``before_lm``); each tile's kept tokens stay right after its own
``<row_r_col_c>`` (or ``<global-img>``) marker. ``layers=[K]`` (or ``[K1, K2, ...]``) prunes inside the language
model instead, FastV-style, as on LLaVA (``in_llm``): each tile keeps ``min(B, n)`` after the last stage.
``pool`` takes ``factor=`` and pools each tile's grid.

The package: this front imports ``before_lm``, ``in_llm``, ``bench`` and ``received``; they import ``common``
(``before_lm`` also ``received``).

Limits: ``forward()`` with pixel values returns logits over the compacted prompt (``vtr.report(model).kept_positions``
maps them back) and refuses ``position_ids``; prompts come as ``input_ids``; ``metric='x'`` only. The report's
images are the tiles.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vtr.budget import visual
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
from .common import SmolVLMReport, cost, smolvlm_classes, tile_tokens

SUPPORTED = "SmolVLMForConditionalGeneration (SmolVLM) and Idefics3ForConditionalGeneration (Idefics3)"


class ReducingSmolVLM(ReducingBeforeOrInLm):
    """Mixed in before the model's own class: ``forward`` and ``generate`` take the path chosen at patch time."""

    _vtr: Reduction
    before_lm = before_lm


class SmolVLM(VlmAdapter):
    """transformers ``SmolVLMForConditionalGeneration`` and ``Idefics3ForConditionalGeneration``."""

    name = "smolvlm"

    def matches(self, model: nn.Module) -> bool:
        """Any SmolVLM or Idefics3 model of transformers (bare ones too, so that they get a clear error)."""
        families = ("transformers.models.smolvlm.", "transformers.models.idefics3.")
        return any(cls.__module__.startswith(families) for cls in type(model).__mro__)

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        if not isinstance(model, smolvlm_classes()):
            raise UnsupportedModelError(f"vtr's SmolVLM adapter supports transformers' {SUPPORTED}; got {kind}, which "
                                        "is not supported (for a bare SmolVLMModel / Idefics3Model, patch the "
                                        "...ForConditionalGeneration that holds it)")

    def missing_signals(self, model: nn.Module, stage: str) -> dict:
        """SmolVLM's SigLIP tower has no [CLS] token; the attention each token receives is given (``received``)."""
        return {Need.CLS_ATTENTION: "its SigLIP tower has no [CLS] token"}

    def cost(self, model: nn.Module, metric: str = "x") -> EncoderCost:
        return cost(model, metric)

    def blocks(self, model: nn.Module) -> nn.Module:
        """The language model's decoder layers: where the visual tokens cost."""
        return decoder(model).layers

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """One tile (the analytic counts are per tile)."""
        vision = model.config.vision_config
        return (vision.num_channels, vision.image_size, vision.image_size)

    def default_input(self, model: nn.Module, batch: int = 1, device: Union[str, torch.device] = "cpu") -> Tensor:
        raise ValueError(f"cannot make an input for {type(model).__name__}: it takes a prompt (input_ids with image "
                         "tokens) as well as pixel_values; pass inputs=")

    def make_schedule(self, model: nn.Module, reducer: Reducer, *, r=None, keep=None, flops=None, layers=None,
                      metric: str = "x", budget: Optional[Union[int, Sequence[int]]] = None,
                      frames: Optional[str] = None, temporal: Optional[float] = None) -> Schedule:
        """``budget=`` (visual tokens kept per tile) as reduction steps on one tile's tokens."""
        others = [k for k, v in (("r", r), ("keep", keep), ("flops", flops)) if v is not None]
        if others:
            raise ValueError(f"the SmolVLM adapter takes budget= (visual tokens kept per tile), not "
                             f"{', '.join(o + '=' for o in others)}")
        if frames is not None or temporal is not None:
            raise ValueError("the SmolVLM adapter reduces images (tiles): leave out frames= and temporal=")
        plan = self.plan(layers=layers, budget=budget)
        return visual.schedule(reducer, plan, num_tokens=tile_tokens(model), num_layers=len(decoder(model).layers),
                               any_size=True, family="SmolVLM")

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
            raise ValueError("the SmolVLM adapter compares visual tokens by their features: use metric='x'")
        if reduction.visual.in_llm:
            pruning.install(model, reduction, in_llm.SmolVLMVisuals())
        received.install(model, reduction)
        model._vtr = reduction
        swap_class(model, ReducingSmolVLM)

    def benchmark_workload(self, model: nn.Module, *args) -> tuple[dict, int, str, dict]:
        return bench.workload(model, *args)

    def benchmark_prompt(self, model: nn.Module, inputs: dict, before: bool, timed):
        return bench.prompt(model, inputs, before, timed)

    def unpatch(self, model: nn.Module) -> None:
        pruning.uninstall(model)
        received.uninstall(model)
        restore_class(model)
        del model._vtr


__all__: Sequence[str] = ["ReducingSmolVLM", "SmolVLM", "SmolVLMReport"]
