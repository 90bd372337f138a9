"""Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL adapter: fewer visual tokens reach the language model; ``generate()``
unchanged.

``vtr.patch(model, method, budget=B)`` keeps ``min(B, its own count)`` visual tokens of each image and
each video, reduced on the vision tower's output after its patch merger; the prompt is compacted and
every kept token keeps its M-RoPE position (``before_lm``). ``pool`` takes ``factor=`` instead: each
image keeps what the factor leaves of its own grid. ``layers=[K]`` (or ``[K1, K2, ...]``) prunes inside
the language model instead, FastV-style, as on LLaVA (``in_llm``): each image keeps ``min(B, its count)``
after the last stage. ``tower_layer=K`` (with ``budget=``) keeps the budget inside the vision tower instead, after
its block K: whole 2x2 merge units are dropped, so the later blocks, the merger and the language model see only the
kept ones (``tower``).

The package: this front (the :class:`QwenVL` adapter and the class mixed into the model) imports
``before_lm`` (which runs ``tower`` when reducing inside the tower) and ``in_llm``, which import ``common`` (which
models, the call's images and videos, positions, costs, the report); the run, prompt compaction, reduction steps
and in-LLM pruning are shared with LLaVA (``vtr.adapters.vlm``).

Qwen3-VL: its DeepStack features (several tower layers' features, added to the visual tokens' hidden states after
each of the first language-model layers) follow the reduction before the LM level by level (``before_lm``: a kept
token's own, a merged token's the mean of the same originals); in-LLM pruning starts after the last DeepStack layer
(``in_llm.check_deepstack``). Its processor gives each temporal patch of a video its own timestamp and vision
markers; the kept tokens of a frame stay between them (``vtr.adapters.vlm.items.kept_columns_by_span``).

Limits: ``forward()`` with pixel values returns logits over the compacted prompt
(``vtr.report(model).kept_positions`` maps them back) and refuses ``position_ids``; prompts come as
``input_ids`` with ``mm_token_type_ids`` (as the processor returns them); ``pool`` reduces before the
language model only; ``metric='x'`` only.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from vtr.budget import visual
from vtr.budget.schedule import Schedule
from vtr.core.plan import Reduction
from vtr.reducers.base import Reducer

from ..errors import UnsupportedModelError
from ..vlm import items
from ..vlm.front import BeforeOrInLmAdapter, ReducingBeforeOrInLm
from ..vlm.run import VlmRun
from . import before_lm, bench, in_llm, received, tower
from .common import REFERENCE_SIDE, QwenVLReport, cost, merge_size, qwen_classes

SUPPORTED = ("Qwen3VLForConditionalGeneration (Qwen3-VL), Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL) and "
             "Qwen2VLForConditionalGeneration (Qwen2-VL)")


class ReducingQwenVL(ReducingBeforeOrInLm):
    """Mixed in before the model's own class: ``forward`` and ``generate`` take the path chosen at patch time."""

    _vtr: Reduction
    before_lm = before_lm

    def remember_prompt(self, run: VlmRun, inputs: Optional[Tensor], kwargs: dict) -> None:
        in_llm.remember(run, self, inputs, kwargs)


class QwenVL(BeforeOrInLmAdapter):
    """transformers ``Qwen3VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
    ``Qwen2VLForConditionalGeneration``: ``budget=`` per image or video; ``tower_layer=K`` keeps it inside the
    vision tower instead."""

    name = "qwen_vl"
    amounts = (*BeforeOrInLmAdapter.amounts, "tower_layer")
    label, unit, features = "Qwen-VL", "image or video", "merged features"
    inputs = "a prompt (input_ids with image tokens, mm_token_type_ids) and image_grid_thw as well as pixel_values"
    reducing, received, bench, visuals = ReducingQwenVL, received, bench, in_llm.QwenVisuals
    family_cost = staticmethod(cost)

    def matches(self, model: nn.Module) -> bool:
        """Any Qwen-VL model of transformers (bare models and Qwen3-VL-MoE too), so that those vtr does not
        support get a clear error."""
        families = tuple(f"transformers.models.{family}." for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                                                                           "qwen3_vl_moe"))
        return any(cls.__module__.startswith(families) for cls in type(model).__mro__)

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        if not isinstance(model, qwen_classes()):
            raise UnsupportedModelError(
                f"vtr's Qwen-VL adapter supports transformers' {SUPPORTED}; got {kind}, which is not supported. "
                "For a bare Qwen3VLModel / Qwen2_5_VLModel / Qwen2VLModel, patch the ...ForConditionalGeneration that "
                "holds it")
        for key in ("image_token_id", "video_token_id"):
            if getattr(model.config, key, None) is None:
                raise UnsupportedModelError(f"{kind}.config.{key} is not set: vtr finds the visual tokens from it")

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """The reference image of the analytic counts: 16 x 16 tokens after the merger (448 x 448 at patch 14).
        Qwen-VL takes any size; each image's own count is used at run time."""
        side = REFERENCE_SIDE * model.config.vision_config.patch_size * merge_size(model)
        return (model.config.vision_config.in_channels, side, side)

    def reference_tokens(self, model: nn.Module) -> int:
        return REFERENCE_SIDE ** 2

    def plan(self, layers=None, budget=None, frames: Optional[str] = None, temporal: Optional[float] = None,
             tower_layer: Optional[int] = None) -> visual.VisualPlan:
        """The typed settings every call reads, ``tower_layer=`` among them (checked by ``make_schedule``)."""
        return visual.VisualPlan.given(budget=budget, layers=layers, frames=frames, temporal=temporal,
                                       tower_layer=tower_layer)

    def make_schedule(self, model: nn.Module, reducer: Reducer, *, r=None, keep=None, flops=None, layers=None,
                      metric: str = "x", budget=None, frames: Optional[str] = None,
                      temporal: Optional[float] = None, tower_layer: Optional[int] = None) -> Schedule:
        """``budget=`` (visual tokens kept per image or video) as reduction steps on the reference image;
        at run time each image takes its own count's steps. ``frames=`` / ``temporal=``: how a video spends it.
        ``tower_layer=K``: the budget is kept inside the vision tower, after its block K (``tower``)."""
        self.refuse_amounts(r, keep, flops)
        if tower_layer is not None:
            tower.check(model, reducer, tower_layer, budget, layers)
        plan = self.plan(layers=layers, budget=budget, frames=frames, temporal=temporal, tower_layer=tower_layer)
        visual.check_video(reducer, plan)
        return self.schedule(model, reducer, plan)

    def expected_flops(self, model: nn.Module, reduction: Optional[Reduction]) -> tuple[float, float]:
        """(reduced, unreduced) language-model prefill MACs of the reference image's visual tokens alone (no
        text), the reducer's own decisions included; the vision tower is the same either way, and not counted,
        except when it reduces inside the tower (``tower_layer=``): both counts then add the tower's MACs on the
        reference image (``tower.expected_macs``)."""
        if reduction is not None and reduction.visual.in_tower:   # the received pass is block K's, in the tower's count
            reduced, unreduced = items.expected_flops(model, reduction, self.cost(model))
            tower_reduced, tower_unreduced = tower.expected_macs(model, reduction, REFERENCE_SIDE)
            return reduced + tower_reduced, unreduced + tower_unreduced
        return super().expected_flops(model, reduction)

    def received_macs(self, model: nn.Module, reduction: Reduction) -> float:
        return received.expected_macs(model, reduction, REFERENCE_SIDE ** 2)

    def check_in_llm(self, model: nn.Module, reduction: Reduction) -> None:
        if "sliding_attention" in (getattr(model.config.text_config, "layer_types", None) or ()):
            raise UnsupportedModelError("in-LLM pruning (layers=) rebuilds each segment's causal mask and does "
                                        "not reproduce sliding-window layers (use_sliding_window=True); reduce "
                                        "before the language model (no layers=)")
        in_llm.check_deepstack(model, reduction)

    def install_before_lm(self, model: nn.Module, reduction: Reduction) -> None:
        if reduction.visual.in_tower:
            tower.install(model, reduction)
        else:
            received.install(model, reduction)

    def unpatch(self, model: nn.Module) -> None:
        tower.uninstall(model)
        super().unpatch(model)


__all__: Sequence[str] = ["QwenVL", "QwenVLReport", "ReducingQwenVL"]
