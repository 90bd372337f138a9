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

from typing import Sequence

from torch import nn

from vtr.core.plan import Reduction
from vtr.core.signals import Need

from ..errors import UnsupportedModelError
from ..vlm.front import BeforeOrInLmAdapter, ReducingBeforeOrInLm
from . import before_lm, bench, in_llm, received
from .common import Gemma3Report, cost, gemma3_classes, image_tokens

SUPPORTED = "Gemma3ForConditionalGeneration (Gemma 3)"


class ReducingGemma3(ReducingBeforeOrInLm):
    """Mixed in before the model's own class: ``forward`` and ``generate`` take the path chosen at patch time."""

    _vtr: Reduction
    before_lm = before_lm


class Gemma3(BeforeOrInLmAdapter):
    """transformers ``Gemma3ForConditionalGeneration``: ``budget=`` per image (each pan-and-scan crop is one)."""

    name = "gemma3"
    label, unit, features = "Gemma 3", "image", "pooled features"
    reducing, received, bench, visuals = ReducingGemma3, received, bench, in_llm.Gemma3Visuals
    family_cost = staticmethod(cost)

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

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        vision = model.config.vision_config
        return (vision.num_channels, vision.image_size, vision.image_size)

    def reference_tokens(self, model: nn.Module) -> int:
        return image_tokens(model)


__all__: Sequence[str] = ["Gemma3", "Gemma3Report", "ReducingGemma3"]
