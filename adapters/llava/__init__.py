"""Hugging Face LLaVA adapter: fewer visual tokens reach (or go through) the language model; ``generate()`` unchanged.

``vtr.patch(model, method, budget=B)`` keeps B visual tokens per image. The path is picked at patch
time:

- no ``layers=``: each image is reduced on the projector output, before the language model, and the
  prompt is compacted (``before_lm``); LLaVA-NeXT (AnyRes: a thumbnail plus crops, a different token
  count per image) splits each image's budget over its thumbnail and crops (``anyres``);
- ``layers=[K]`` prunes inside the language model at decoder layer K (FastV-style),
  ``layers=[K1, K2, ...]`` progressively at each of them (``in_llm``); on LLaVA-NeXT each image keeps
  ``min(budget, its own count)``.

The package: this front (the :class:`Llava` adapter and the class mixed into the model) imports
``before_lm``, ``anyres`` and ``in_llm``; ``before_lm`` imports ``anyres``; all three import ``common``
(the per-call run, image token counts, costs, the report, prompt compaction), which imports none of them.

What a patched model holds is settings: the frozen :class:`~vtr.core.plan.Reduction`, in-LLM pruning's
stages, and hooks of plain classes, so it pickles, deep-copies and can be shared by threads. Every call
(``forward``, or a whole ``generate()`` with its decode steps) opens a run (``vtr.adapters.vlm.run.VlmRun``) for what it
computes; the detached :class:`~vtr.adapters.llava.common.LlavaReport` is what outlives it, read by
``vtr.report(model)`` in the caller's thread.

``pool`` keeps the count its integer factor gives: ``budget=`` picks the factor that keeps exactly that
many (LLaVA-1.5; refused, with the budgets it can keep, where no factor does or a given ``factor=``
disagrees); LLaVA-NeXT refuses it.

Limits: ``prop_attn`` has no effect here (the language model's attention is not changed; a merged
token counts once); ``forward()`` with ``pixel_values`` returns logits over the compacted prompt
(``vtr.report(model).kept_positions`` maps them back; ``labels`` are compacted alike, on both paths)
and refuses ``position_ids``; prompts must come as ``input_ids``; ``image_sizes`` is for LLaVA-NeXT only.
LLaVA-OneVision and LLaVA-NeXT-Video (images and videos, each of its own count) take the path of ``video``
before the language model, and ``in_llm`` with ``video.VideoVisuals`` inside it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vtr.budget.cost import EncoderCost
from vtr.budget import visual
from vtr.budget.schedule import Schedule
from vtr.core.plan import Reduction
from vtr.core.signals import Need
from vtr.reducers.base import Reducer

from .. import steps
from ..base import restore_class, swap_class
from ..errors import UnsupportedModelError
from ..vlm.front import ReducingVlm, VlmAdapter
from ..vlm.run import VlmRun
from ..vlm import items
from . import anyres, before_lm, bench, in_llm, received, video
from .common import LlavaReport, cost, feature_attention, image_tokens, is_next, llava_classes, prefill_macs


# The path a patched model takes is chosen once, at patch time, by the class mixed in before the model's own:
# ``forward`` and ``generate`` open the call's run (``ReducingVlm``) and go one way; all else is the model's own.

class ReducingLlava(ReducingVlm):
    """Images reduced before the language model, the prompt compacted (LLaVA-1.5; LLaVA-NeXT's AnyRes crops)."""

    _vtr: Reduction

    def vtr_forward(self, run: VlmRun, original_forward, arguments: dict):
        return before_lm.forward(self, original_forward, arguments)

    def vtr_generate(self, run: VlmRun, generate, inputs: Optional[Tensor], *args, **kwargs):
        return before_lm.generate(self, generate, inputs, *args, **kwargs)


class ReducingLlavaVideo(ReducingVlm):
    """Images and videos, each of its own count, reduced before the language model (OneVision, NeXT-Video)."""

    _vtr: Reduction

    def vtr_forward(self, run: VlmRun, original_forward, arguments: dict):
        return video.forward(self, original_forward, arguments)

    def vtr_generate(self, run: VlmRun, generate, inputs: Optional[Tensor], *args, **kwargs):
        return video.generate(self, generate, inputs, *args, **kwargs)


class PruningLlava(ReducingVlm):
    """Visual tokens pruned inside the language model (``layers=``): hooks on its decoder layers do the work."""

    _vtr: Reduction

    def vtr_forward(self, run: VlmRun, original_forward, arguments: dict):
        return in_llm.forward(self, run, original_forward, arguments)

    def vtr_generate(self, run: VlmRun, generate, inputs: Optional[Tensor], *args, **kwargs):
        in_llm.check_generate(self, kwargs)
        return generate(inputs, *args, **kwargs)


class PruningLlavaVideo(PruningLlava):
    """In-LLM pruning on OneVision / NeXT-Video: a forward with pixels encodes them first (the counts come from
    the features)."""

    def vtr_forward(self, run: VlmRun, original_forward, arguments: dict):
        return super().vtr_forward(run, original_forward, video.encoded(self, arguments))


def fixed_count_budget(model: nn.Module, reduction: Reduction) -> Reduction:
    """A ``fixed_count`` reducer (``pool``) on LLaVA-1.5: its options set the count, so ``budget=`` picks them (the
    reducer's :meth:`~vtr.reducers.Reducer.for_budget`) or, met by none or contradicting the options given, is
    refused here, at patch time, with the budgets it can keep on this model."""
    budget, layers = reduction.visual.budget, reduction.visual.layers
    if isinstance(budget, bool) or not isinstance(budget, int) or (layers is not None and len(layers) != 1):
        return reduction        # per-stage budgets (in-LLM): pool pools once, at the first stage
    num_tokens, protected = image_tokens(model)
    side = math.isqrt(num_tokens - protected)
    if side * side != num_tokens - protected:
        return reduction        # no square grid: pool refuses at the call
    options_given = bool(set(reduction.arguments) - {"budget", "layers", "active"})
    reducer = reduction.reducer.for_budget((side, side), protected, budget, options_given)
    return reduction if reducer is reduction.reducer else dataclasses.replace(reduction, reducer=reducer)


class Llava(VlmAdapter):
    """transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5) and ``LlavaNextForConditionalGeneration``."""

    name = "llava"
    amounts = (*VlmAdapter.amounts, "positions")

    def matches(self, model: nn.Module) -> bool:
        """Any LLaVA-family model of transformers, so that unsupported members get a clear error."""
        return any(cls.__module__.startswith("transformers.models.llava") for cls in type(model).__mro__)

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        classes = llava_classes()
        next_ = is_next(model)
        if video.is_video_model(model):
            for key in ("image_token_id", "video_token_id"):
                if getattr(model.config, key, None) is None:
                    raise UnsupportedModelError(f"{kind}.config.{key} is not set: vtr finds the visual tokens from it")
            return
        if not next_ and (not classes or not isinstance(model, classes[0])):
            raise UnsupportedModelError(
                f"vtr's LLaVA adapter supports transformers' LlavaForConditionalGeneration (LLaVA-1.5), "
                f"LlavaNextForConditionalGeneration (LLaVA-NeXT, AnyRes), LlavaOnevisionForConditionalGeneration and "
                f"LlavaNextVideoForConditionalGeneration; got {kind}, which is not supported. "
                "For a bare LlavaModel / LlavaNextModel, patch the ...ForConditionalGeneration that holds it"
            )
        config = model.config
        if getattr(config, "image_token_id", None) is None:
            raise UnsupportedModelError(f"{kind}.config.image_token_id is not set: vtr finds the image span from it")
        if next_:
            anyres.check(model)
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}; supported: 'default', "
                "'full'"
            )

    def missing_signals(self, model: nn.Module, stage: str) -> dict:
        """LLaVA-OneVision's SigLIP tower has no [CLS] token: the attention each token receives is given instead
        (``received``), where the features are one layer's; the other LLaVAs' CLIP towers give the [CLS] row."""
        if not (video.is_video_model(model) and video.is_onevision(model)):
            return {}
        missing = {Need.CLS_ATTENTION: "its SigLIP tower has no [CLS] token"}
        if received.feature_attention(model) is None:
            missing[Need.ATTENTION_RECEIVED] = ("vision_feature_layer selects the embeddings or several layers, not one "
                                                "attention layer's output")
        return missing

    def cost(self, model: nn.Module, metric: str = "x") -> EncoderCost:
        return video.cost(model, metric) if video.is_video_model(model) else cost(model, metric)

    def blocks(self, model: nn.Module) -> nn.Module:
        """The language model's decoder layers: where the visual tokens cost."""
        return model.model.language_model.layers

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of one image (LLaVA-NeXT: of one crop, and of the thumbnail)."""
        vision = model.config.vision_config
        return (getattr(vision, "num_channels", 3), vision.image_size, vision.image_size)

    def default_input(self, model: nn.Module, batch: int = 1, device: Union[str, torch.device] = "cpu") -> Tensor:
        raise ValueError(f"cannot make an input for {type(model).__name__}: it takes a prompt (input_ids with "
                         "image tokens) as well as pixel_values; pass inputs=")

    def make_schedule(self, model: nn.Module, reducer: Reducer, *, r=None, keep=None, flops=None, layers=None,
                      metric: str = "x", budget: Optional[Union[int, Sequence[int]]] = None,
                      frames: Optional[str] = None, temporal: Optional[float] = None,
                      positions: Optional[str] = None) -> Schedule:
        """``budget=`` (visual tokens kept per image) as a schedule of reduction steps.

        ``layers=None`` reduces on the projector output, before the language model; ``layers=[K]``
        prunes inside the language model at decoder layer K (FastV-style), ``layers=[K1, K2, ...]``
        progressively at each of them (``budget=`` the final count, or one count per layer; see
        ``in_llm``).
        """
        others = [k for k, v in (("r", r), ("keep", keep), ("flops", flops)) if v is not None]
        if others:
            raise ValueError(f"the LLaVA adapter takes budget= (visual tokens kept per image), not "
                             f"{', '.join(o + '=' for o in others)}")
        plan = self.plan(layers=layers, budget=budget, frames=frames, temporal=temporal, positions=positions)
        num_layers = len(model.model.language_model.layers)
        if video.is_video_model(model):
            visual.check_video(reducer, plan)
            return visual.schedule(reducer, plan, num_tokens=video.reference_side(model) ** 2, num_layers=num_layers,
                                   any_size=True, family=video.NAME)
        if frames is not None or temporal is not None:
            raise ValueError(f"frames= and temporal= split a video's budget; {type(model).__name__} takes no videos")
        num_tokens, protected = image_tokens(model)
        return visual.schedule(reducer, plan, num_tokens=num_tokens, num_protected=protected, num_layers=num_layers,
                               any_size=False, family="LLaVA",
                               low=anyres.MIN_BUDGET if is_next(model) else protected + 1)

    def plan(self, layers=None, budget=None, frames: Optional[str] = None, temporal: Optional[float] = None,
             positions: Optional[str] = None) -> visual.VisualPlan:
        """``positions=``: images reduced before the language model keep their original positions unless
        ``"compact"`` is asked for (see :mod:`.before_lm`); videos and in-LLM pruning keep what they do today (a
        video's prompt is compacted; in the LLM nothing is), so an explicit ``positions=`` there is refused."""
        base = super().plan(layers=layers, budget=budget, frames=frames, temporal=temporal)
        video_or_llm = layers is not None or frames is not None or temporal is not None
        if positions is not None and video_or_llm:
            raise ValueError("positions= numbers the tokens an image keeps before the language model; leave it out "
                             "with layers= (pruning inside the language model keeps every position) and for videos")
        return dataclasses.replace(base, positions=positions or ("compact" if video_or_llm else "original"))

    def expected_flops(self, model: nn.Module, reduction: Optional[Reduction]) -> tuple[float, float]:
        """(reduced, unreduced) language-model prefill MACs of one image's visual tokens alone (no text),
        the reducer's own decisions included (in-LLM: each stage's scoring too); the vision tower is the
        same either way. LLaVA-NeXT: of the largest image. In-LLM: the image and one text token after it (the
        shortest prompt in-LLM pruning takes)."""
        stages = in_llm.stages_of(model)
        if reduction is not None and stages is not None:
            return in_llm.expected_flops(model, reduction, stages)
        if video.is_video_model(model):
            tower = received.expected_macs(model, reduction) if reduction is not None and video.is_onevision(model) \
                else 0.0
            return items.expected_flops(model, reduction, video.cost(model), tower)
        if reduction is None:
            unreduced = float(prefill_macs(model, torch.tensor([image_tokens(model)[0]])))
            return unreduced, unreduced
        return before_lm.expected_flops(model, reduction)

    def patch(self, model: nn.Module, reduction: Reduction) -> None:
        reduction = steps.dropping_as_published(reduction)   # fuse="nearest" is measured on vision encoders only
        if reduction.metric != "x":
            raise ValueError("the LLaVA adapter compares visual tokens by their projected features: use metric='x'")
        if video.is_video_model(model):
            if "positions" in reduction.arguments and reduction.visual.positions != "compact":
                raise ValueError(f"positions={reduction.visual.positions!r} is for LLaVA-1.5 / LLaVA-NeXT images; "
                                 f"{type(model).__name__}'s prompt is compacted (leave positions= out)")
            reduction = dataclasses.replace(reduction, visual=dataclasses.replace(reduction.visual, positions="compact"))
            if reduction.visual.in_llm:
                in_llm.install(model, reduction, video.VideoVisuals())
            elif not video.is_onevision(model):   # NeXT-Video's CLIP tower has a CLS row (SigLIP's has none)
                before_lm.install(model, reduction)
            else:                                  # OneVision's SigLIP: the attention each token receives
                received.install(model, reduction)
            model._vtr = reduction
            swap_class(model, PruningLlavaVideo if reduction.visual.in_llm else ReducingLlavaVideo)
            return
        if is_next(model):
            anyres.check_reduction(model, reduction)
        elif reduction.reducer.fixed_count:
            reduction = fixed_count_budget(model, reduction)
        if Need.CLS_ATTENTION in reduction.reducer.needs:
            feature_attention(model)   # fail at patch time, not at the first call
            before_lm.allocation_attention(model, reduction)
        if reduction.visual.in_llm:
            in_llm.install(model, reduction)
        else:
            before_lm.install(model, reduction)
        model._vtr = reduction
        swap_class(model, PruningLlava if reduction.visual.in_llm else ReducingLlava)

    def benchmark_workload(self, model: nn.Module, *args) -> tuple[dict, int, str, dict]:
        return bench.workload(model, *args)

    def benchmark_prompt(self, model: nn.Module, inputs: dict, before: bool, timed):
        return bench.prompt(model, inputs, before, timed)

    def unpatch(self, model: nn.Module) -> None:
        in_llm.uninstall(model)
        before_lm.uninstall(model)
        received.uninstall(model)
        restore_class(model)
        del model._vtr


__all__: Sequence[str] = ["Llava", "LlavaReport", "PruningLlava", "PruningLlavaVideo", "ReducingLlava",
                          "ReducingLlavaVideo"]
