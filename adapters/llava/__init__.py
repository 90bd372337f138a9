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
(``forward``, or a whole ``generate()`` with its decode steps) opens a run (``common.LlavaRun``) for what it
computes; the detached :class:`~vtr.adapters.llava.common.LlavaReport` is what outlives it, read by
``vtr.report(model)`` in the caller's thread.

``pool`` keeps the count its integer factor gives: ``budget=`` picks the factor that keeps exactly that
many (LLaVA-1.5; refused, with the budgets it can keep, where no factor does or a given ``factor=``
disagrees); LLaVA-NeXT refuses it.

Limits: ``prop_attn`` has no effect here (the language model's attention is not changed; a merged
token counts once); ``forward()`` with ``pixel_values`` returns logits over the compacted prompt
(``vtr.report(model).kept_positions`` maps them back) and refuses ``position_ids``; prompts must
come as ``input_ids``; ``image_sizes`` is for LLaVA-NeXT only; other LLaVA-family models
(LLaVA-NeXT-Video, LLaVA-OneVision, VipLLaVA, ...) are refused with UnsupportedModelError.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vtr.budget.cost import EncoderCost
from vtr.budget.schedule import Schedule
from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.signals import Need
from vtr.reducers.base import Reducer
from vtr.reducers.pool import GridPool

from ..base import Adapter, Swapped, restore_class, swap_class
from ..errors import UnsupportedModelError
from . import anyres, before_lm, in_llm
from .common import (LlavaReport, cost, feature_attention, image_tokens, is_next, llava_classes, opened,
                     prefill_macs, reduction_steps)


class ReducingLlava(Swapped):
    """Mixed in before the model's own class: ``forward`` and ``generate`` open the call's run and take
    the path chosen at patch time; everything else is the model's own."""

    _vtr: Reduction

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        original = cls.__dict__.get("_vtr_original")
        if original is not None:   # the class (this mixin, a LLaVA class): forward with the original's signature
            original_forward = original.forward

            @functools.wraps(original_forward)   # generate() reads forward's signature (mm_encoder_outputs, ...)
            def forward(self, *args, **kwargs):
                return _forward(self, original_forward, *args, **kwargs)

            cls.forward = forward

    def generate(self, inputs: Optional[Tensor] = None, *args, **kwargs):
        if runs.active(self._vtr) is None and runs.skips(self._vtr, self.training):
            with runs.switched_off(self._vtr):   # vtr.disabled, or eval mode under active="train"
                return super().generate(inputs, *args, **kwargs)
        with opened(self):      # one run for the prefill and every decode step
            if in_llm.stages_of(self) is not None:   # in-LLM pruning: hooks on the decoder layers do the work
                in_llm.check_generate(self, kwargs)
                return super().generate(inputs, *args, **kwargs)
            return before_lm.generate(self, super().generate, inputs, *args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Saved as the original class (``config.architectures`` names it): the unpatched model's checkpoint,
        weights untouched. Through a view of the same modules, so the model itself stays patched throughout
        (other threads may be calling it)."""
        view = object.__new__(type(self)._vtr_original)
        object.__setattr__(view, "__dict__", self.__dict__)
        return view.save_pretrained(*args, **kwargs)


def pool_factor(model: nn.Module, reduction: Reduction) -> Reduction:
    """``pool`` on LLaVA-1.5: its factor sets the count, so ``budget=`` picks the factor (the smallest that
    keeps exactly ``budget`` tokens per image) or, met by none or contradicting a given ``factor=``, is
    refused here, at patch time, with the budgets pool can keep on this model."""
    budget, layers = reduction.arguments.get("budget"), reduction.arguments.get("layers")
    if isinstance(budget, bool) or not isinstance(budget, int) or (layers is not None and len(layers) != 1):
        return reduction        # per-stage budgets (in-LLM): pool pools once, at the first stage
    num_tokens, protected = image_tokens(model)
    side = math.isqrt(num_tokens - protected)
    if side * side != num_tokens - protected:
        return reduction        # no square grid: pool refuses at the call
    grid = (side, side)
    counts = GridPool.budgets(grid, protected)
    rule = (f"pool keeps {'1 + ' if protected else ''}ceil({side}/f)^2 tokens per image for factor f "
            f"(f=1: none pooled), so budget must be one of {', '.join(map(str, counts))}")
    if "factor" in reduction.arguments:
        factor = reduction.reducer.factor
        kept = protected + math.prod(reduction.reducer.pooled_grid(grid))
        if kept != budget:
            raise ValueError(f"budget={budget} disagrees with factor={factor}, which keeps {kept} visual tokens "
                             f"per image: {rule} (or leave out budget= or factor=)")
        return reduction
    if budget not in counts:
        raise ValueError(f"method 'pool' cannot keep budget={budget} visual tokens per image on this model: {rule}")
    if counts[budget] == 1:
        return reduction        # budget is every token: the schedule does not reduce
    return dataclasses.replace(reduction, reducer=GridPool(factor=counts[budget]))


def _forward(model: nn.Module, original_forward, *args, **kwargs):
    if runs.active(model._vtr) is None and runs.skips(model._vtr, model.training):
        with runs.switched_off(model._vtr):   # vtr.disabled, or eval mode under active="train": the unpatched model
            return original_forward(model, *args, **kwargs)
    bound = inspect.signature(original_forward).bind(model, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self")
    arguments |= arguments.pop("kwargs", {})
    with opened(model) as run:
        if in_llm.stages_of(model) is not None:
            return in_llm.forward(model, run, original_forward, arguments)
        return before_lm.forward(model, original_forward, arguments)


class Llava(Adapter):
    """transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5) and ``LlavaNextForConditionalGeneration``."""

    name = "llava"
    amounts = ("budget",)          # vtr.patch(model, method, budget=64): visual tokens kept per image
    learned_reducers = False       # not yet: budgets are per image, learned modules per block of an encoder

    def matches(self, model: nn.Module) -> bool:
        """Any LLaVA-family model of transformers, so that unsupported members get a clear error."""
        return (type(model).__module__.startswith("transformers.models.llava")
                or isinstance(model, llava_classes()) or is_next(model))

    def check(self, model: nn.Module) -> None:
        kind = type(model).__name__
        classes = llava_classes()
        next_ = is_next(model)
        if not next_ and (not classes or not isinstance(model, classes[0])):
            raise UnsupportedModelError(
                f"vtr's LLaVA adapter supports transformers' LlavaForConditionalGeneration (LLaVA-1.5) and "
                f"LlavaNextForConditionalGeneration (LLaVA-NeXT, AnyRes); got {kind}, which is not supported. "
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

    def cost(self, model: nn.Module, metric: str = "x") -> EncoderCost:
        return cost(model, metric)

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
                      metric: str = "x", budget: Optional[Union[int, Sequence[int]]] = None) -> Schedule:
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
        num_tokens, protected = image_tokens(model)
        low = anyres.MIN_BUDGET if is_next(model) else protected + 1
        if layers is not None:
            num_stages = len(in_llm.stage_layers(layers, len(model.model.language_model.layers)))
            if reducer.max_step != 0.0 and budget is not None:
                budgets = in_llm.stage_budgets(budget, num_tokens, protected, num_stages)
                steps = []
                for entering, kept in zip([num_tokens] + budgets, budgets):
                    steps += reduction_steps(entering, kept, reducer, protected)
                return Schedule("r", tuple(steps) or (0,))
        if reducer.max_step == 0.0:  # the 'none' method
            if budget not in (None, num_tokens):
                raise ValueError(f"method {reducer.name!r} does not reduce; leave out budget= (or set "
                                 f"budget={num_tokens})")
            return Schedule("r", (0,))
        if budget is None:
            raise ValueError(f"method {reducer.name!r} needs budget= (visual tokens kept per image, "
                             f"{low}..{num_tokens})")
        if isinstance(budget, bool) or not isinstance(budget, int) or not low <= budget <= num_tokens:
            raise ValueError(
                f"budget must be an int in [{low}, {num_tokens}] (visual tokens kept per image; this model "
                f"gives at most {num_tokens} per image), got {budget!r}"
            )
        return Schedule("r", tuple(reduction_steps(num_tokens, budget, reducer, protected)) or (0,))

    def expected_flops(self, model: nn.Module, reduction: Optional[Reduction]) -> tuple[float, float]:
        """(reduced, unreduced) language-model prefill MACs of one image's visual tokens alone (no text),
        the reducer's own decisions included (in-LLM: each stage's scoring too); the vision tower is the
        same either way. LLaVA-NeXT: of the largest image."""
        if reduction is None:
            unreduced = float(prefill_macs(model, torch.tensor([image_tokens(model)[0]])))
            return unreduced, unreduced
        stages = in_llm.stages_of(model)
        if stages is not None:
            return in_llm.expected_flops(model, reduction, stages)
        return before_lm.expected_flops(model, reduction)

    def patch(self, model: nn.Module, reduction: Reduction) -> None:
        if reduction.metric != "x":
            raise ValueError("the LLaVA adapter compares visual tokens by their projected features: use metric='x'")
        if is_next(model):
            anyres.check_reduction(model, reduction)
        elif isinstance(reduction.reducer, GridPool):
            reduction = pool_factor(model, reduction)
        if Need.CLS_ATTENTION in reduction.reducer.needs:
            feature_attention(model)   # fail at patch time, not at the first call
            before_lm.allocation_attention(model, reduction)
        if reduction.arguments.get("layers") is not None:
            in_llm.install(model, reduction)
        else:
            before_lm.install(model, reduction)
        model._vtr = reduction
        swap_class(model, ReducingLlava)

    def unpatch(self, model: nn.Module) -> None:
        in_llm.uninstall(model)
        before_lm.uninstall(model)
        restore_class(model)
        del model._vtr


__all__: Sequence[str] = ["Llava", "LlavaReport", "ReducingLlava"]
