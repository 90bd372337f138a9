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

from typing import Sequence

from torch import nn

from vtr.core.plan import Reduction
from vtr.core.signals import Need

from ..errors import UnsupportedModelError
from ..vlm.front import BeforeOrInLmAdapter, ReducingBeforeOrInLm
from . import before_lm, bench, in_llm, received
from .common import SmolVLMReport, cost, smolvlm_classes, tile_tokens

SUPPORTED = "SmolVLMForConditionalGeneration (SmolVLM) and Idefics3ForConditionalGeneration (Idefics3)"


class ReducingSmolVLM(ReducingBeforeOrInLm):
    """Mixed in before the model's own class: ``forward`` and ``generate`` take the path chosen at patch time."""

    _vtr: Reduction
    before_lm = before_lm


class SmolVLM(BeforeOrInLmAdapter):
    """transformers ``SmolVLMForConditionalGeneration`` and ``Idefics3ForConditionalGeneration``: ``budget=`` per
    tile."""

    name = "smolvlm"
    label, unit = "SmolVLM", "tile"
    reducing, received, bench, visuals = ReducingSmolVLM, received, bench, in_llm.SmolVLMVisuals
    family_cost = staticmethod(cost)

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

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """One tile (the analytic counts are per tile)."""
        vision = model.config.vision_config
        return (vision.num_channels, vision.image_size, vision.image_size)

    def reference_tokens(self, model: nn.Module) -> int:
        return tile_tokens(model)


__all__: Sequence[str] = ["ReducingSmolVLM", "SmolVLM", "SmolVLMReport"]
