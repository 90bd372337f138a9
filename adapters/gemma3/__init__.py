"""Hugging Face Gemma 3 adapter: fewer visual tokens reach the language model; ``generate()`` unchanged.

``vtr.patch(model, method, budget=B)`` keeps ``min(B, mm_tokens_per_image)`` tokens of each image (each
pan-and-scan crop is an image), reduced on the projector's output: SigLIP's patches already average-pooled to
the fixed count the language model reads (``before_lm``). ``pool`` takes ``factor=`` and pools that grid again.
Each image's kept tokens still attend to each other both ways in the language model, as Gemma 3 was trained:
the compacted prompt's ``token_type_ids`` mark them as one image. ``layers=[K]`` (or ``[K1, K2, ...]``) prunes
inside the language model instead, FastV-style (``in_llm``): each image keeps ``min(B, mm_tokens_per_image)``
after the last stage, and the layers past the pruning get Gemma 3's own masks rebuilt for the kept tokens
(bidirectional within an image, sliding windows on the local layers).

The package: this front imports ``before_lm``, ``in_llm``, ``bench`` and ``received``, which import ``common``
(``before_lm`` also ``received``).

Limits: ``forward()`` with pixel values returns logits over the compacted prompt (``vtr.report(model).kept_positions``
maps them back) and refuses ``position_ids``; prompts come as ``input_ids``; ``metric='x'`` only.
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
from . import before_lm, bench, in_llm, received
from .common import Gemma3Report, cost, gemma3_classes, image_tokens

SUPPORTED = "Gemma3ForConditionalGeneration (Gemma 3)"


class ReducingGemma3(ReducingBeforeOrInLm):
    """Mixed in before the model's own class: ``forward`` and ``generate`` take the path chosen at patch time."""

    _vtr: Reduction
    before_lm = before_lm


class Gemma3(VlmAdapter):
    """transformers ``Gemma3ForConditionalGeneration``."""

    name = "gemma3"

    def matches(self, model: nn.Module) -> bool:
        """Any Gemma 3 model of transformers (bare ones too, so that they get a clear error)."""
        return any(cls.__module__.startswith("transformers.models.gemma3.") for cls in type(model).__mro__)

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        if not isinstance(model, gemma3_classes()):
            raise UnsupportedModelError(f"vtr's Gemma 3 adapter supports transformers' {SUPPORTED}; got {kind}, which "
                                        "is not supported (a text-only Gemma 3 has no visual tokens; for a bare "
                                        "Gemma3Model, patch the Gemma3ForConditionalGeneration that holds it)")

    def missing_signals(self, model: nn.Module, stage: str) -> dict:
        """Gemma 3's SigLIP tower has no [CLS] token; the attention each token receives is given (``received``)."""
        return {Need.CLS_ATTENTION: "its SigLIP tower has no [CLS] token"}

    def cost(self, model: nn.Module, metric: str = "x") -> EncoderCost:
        return cost(model, metric)

    def blocks(self, model: nn.Module) -> nn.Module:
        """The language model's decoder layers: where the visual tokens cost."""
        return model.model.language_model.layers

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        vision = model.config.vision_config
        return (vision.num_channels, vision.image_size, vision.image_size)

    def default_input(self, model: nn.Module, batch: int = 1, device: Union[str, torch.device] = "cpu") -> Tensor:
        raise ValueError(f"cannot make an input for {type(model).__name__}: it takes a prompt (input_ids with image "
                         "tokens) as well as pixel_values; pass inputs=")

    def make_schedule(self, model: nn.Module, reducer: Reducer, *, r=None, keep=None, flops=None, layers=None,
                      metric: str = "x", budget: Optional[Union[int, Sequence[int]]] = None,
                      frames: Optional[str] = None, temporal: Optional[float] = None) -> Schedule:
        """``budget=`` (visual tokens kept per image) as reduction steps on one image's pooled tokens."""
        others = [k for k, v in (("r", r), ("keep", keep), ("flops", flops)) if v is not None]
        if others:
            raise ValueError(f"the Gemma 3 adapter takes budget= (visual tokens kept per image), not "
                             f"{', '.join(o + '=' for o in others)}")
        if frames is not None or temporal is not None:
            raise ValueError("Gemma 3 takes images only: leave out frames= and temporal=")
        plan = self.plan(layers=layers, budget=budget)
        return visual.schedule(reducer, plan, num_tokens=image_tokens(model),
                               num_layers=len(model.model.language_model.layers), any_size=True, family="Gemma 3")

    def expected_flops(self, model: nn.Module, reduction: Optional[Reduction]) -> tuple[float, float]:
        """(reduced, unreduced) language-model prefill MACs of one image's visual tokens alone (no text), the
        reducer's own decisions included; the vision tower is the same either way."""
        stages = pruning.stages_of(model)
        if reduction is not None and stages is not None:
            return pruning.expected_flops(model, reduction, stages)
        return items.expected_flops(model, reduction, cost(model),
                                    0.0 if reduction is None else received.expected_macs(model, reduction))

    def patch(self, model: nn.Module, reduction: Reduction) -> None:
        reduction = steps.dropping_as_published(reduction)
        if reduction.metric != "x":
            raise ValueError("the Gemma 3 adapter compares visual tokens by their pooled features: use metric='x'")
        if reduction.visual.in_llm:
            pruning.install(model, reduction, in_llm.Gemma3Visuals())
        else:
            received.install(model, reduction)
        model._vtr = reduction
        swap_class(model, ReducingGemma3)

    def benchmark_workload(self, model: nn.Module, *args) -> tuple[dict, int, str, dict]:
        return bench.workload(model, *args)

    def benchmark_prompt(self, model: nn.Module, inputs: dict, before: bool, timed):
        return bench.prompt(model, inputs, before, timed)

    def unpatch(self, model: nn.Module) -> None:
        received.uninstall(model)
        pruning.uninstall(model)
        restore_class(model)
        del model._vtr


__all__: Sequence[str] = ["Gemma3", "Gemma3Report", "ReducingGemma3"]
