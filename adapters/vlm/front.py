"""The class vtr mixes into a vision-language model: ``forward`` and ``generate`` open the call's run and take
the family's path; everything else (``save_pretrained`` included) is the model's own."""
from __future__ import annotations

import functools
from typing import Callable, Optional

from torch import Tensor, nn

from vtr.budget import visual
from vtr.budget.cost import EncoderCost
from vtr.budget.schedule import Schedule
from vtr.budget.visual import VisualPlan
from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.reducers.base import Reducer

from .. import steps
from ..base import Adapter, Swapped, restore_class, swap_class
from . import in_llm, items
from .language import decoder
from .calls import arguments_by_name
from .run import VlmRun, opened
from .video import VIDEO_OPTIONS


class ReducingVlm(Swapped):
    """Base of each family's mixin, which says what a call does: ``vtr_forward(run, original_forward, arguments)``
    (``arguments``: the call's arguments by name) and ``vtr_generate(run, generate, inputs, *args, **kwargs)``
    (``generate``: the model's own)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        original = cls.__dict__.get("_vtr_original")
        if original is not None:   # the class (a family's mixin, a model class): forward with the original's signature
            original_forward = original.forward

            @functools.wraps(original_forward)   # generate() reads forward's signature (mm_encoder_outputs, ...)
            def forward(self, *args, **kwargs):
                if runs.active(self._vtr) is None and runs.skips(self._vtr, self.training):
                    with runs.unreduced(self._vtr):   # vtr.disabled, or eval mode under active="train"
                        return original_forward(self, *args, **kwargs)
                arguments = arguments_by_name(original_forward, self, args, kwargs)
                with opened(self) as run:
                    return self.vtr_forward(run, original_forward, arguments)

            cls.forward = forward

    def vtr_forward(self, run: VlmRun, original_forward: Callable, arguments: dict):
        raise NotImplementedError

    def vtr_generate(self, run: VlmRun, generate: Callable, inputs: Optional[Tensor], *args, **kwargs):
        raise NotImplementedError

    def generate(self, inputs: Optional[Tensor] = None, *args, **kwargs):
        if runs.active(self._vtr) is None and runs.skips(self._vtr, self.training):
            with runs.unreduced(self._vtr):   # vtr.disabled, or eval mode under active="train"
                return super().generate(inputs, *args, **kwargs)
        with opened(self) as run:      # one run for the prefill and every decode step
            return self.vtr_generate(run, super().generate, inputs, *args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Saved as the original class (``config.architectures`` names it): the unpatched model's checkpoint,
        weights untouched. Through a view of the same modules, so the model itself stays patched throughout
        (other threads may be calling it)."""
        view = object.__new__(type(self)._vtr_original)
        object.__setattr__(view, "__dict__", self.__dict__)
        return view.save_pretrained(*args, **kwargs)


class ReducingBeforeOrInLm(ReducingVlm):
    """The mixin of a family reduced either before the language model (its ``before_lm`` module's ``forward`` and
    ``generate``) or inside it (``layers=``: hooks on the decoder layers do the work, :mod:`.in_llm`), as chosen at
    patch time. A family sets ``before_lm``; ``remember_prompt`` is its hook before an in-LM ``generate()``."""

    before_lm = None   # the family's module: forward(model, original_forward, arguments), generate(model, ...)

    def vtr_forward(self, run: VlmRun, original_forward: Callable, arguments: dict):
        if in_llm.stages_of(self) is not None:
            return in_llm.forward(self, run, original_forward, arguments)
        return self.before_lm.forward(self, original_forward, arguments)

    def vtr_generate(self, run: VlmRun, generate: Callable, inputs: Optional[Tensor], *args, **kwargs):
        if in_llm.stages_of(self) is not None:
            in_llm.check_generate(self, kwargs)
            self.remember_prompt(run, inputs, kwargs)
            return generate(inputs, *args, **kwargs)
        return self.before_lm.generate(self, generate, inputs, *args, **kwargs)

    def remember_prompt(self, run: VlmRun, inputs: Optional[Tensor], kwargs: dict) -> None:
        """What an in-LM ``generate()`` must keep of its prompt before the first forward (nothing, by default)."""


class VlmAdapter(Adapter):
    """What every vision-language family's adapter shares: ``budget=`` visual tokens kept per image or video
    (``frames=`` and ``temporal=`` say how a video spends it, :mod:`vtr.adapters.vlm.video`), visual tokens
    compared by their features, and no learned reducers yet (budgets are per image, learned modules per
    block of an encoder)."""

    amounts = ("budget", *VIDEO_OPTIONS)
    metrics = ("x",)
    learned_reducers = False

    def stage(self, layers) -> str:
        """Before the language model, or inside it with ``layers=``."""
        return "before_lm" if layers is None else "in_lm"

    def default_stage_layers(self, model: nn.Module, reducer, layers):
        """A method that acts only inside the language model (DART, PyramidDrop) prunes at its own default
        decoder layers when ``layers=`` is left out."""
        if layers is None and "before_lm" not in reducer.stages and "in_lm" in reducer.stages:
            found = reducer.default_layers(len(self.blocks(model)))
            return layers if found is None else found
        return layers

    def plan(self, layers=None, budget=None, frames: Optional[str] = None,
             temporal: Optional[float] = None) -> VisualPlan:
        """The typed settings every call reads (never ``Reduction.arguments``, which is what the user typed)."""
        return VisualPlan.given(budget=budget, layers=layers, frames=frames, temporal=temporal)

    # The family's hooks for the VLM prefill benchmark (vtr.tools.bench_vlm), so the tool needs no family's internals.
    def benchmark_workload(self, model: nn.Module, text: int, batch: int, image_size: Optional[int],
                           video_frames: int, frames: Optional[str]) -> tuple:
        """(inputs, visual tokens per prompt, description, extra ``vtr.patch`` keywords) of ``batch`` copies of
        one prompt of ``text`` text tokens and one image (or ``video_frames``-frame video) with random pixels; a
        fifth value where ``budget=`` counts less than the prompt's visual tokens (SmolVLM: one tile's)."""
        raise NotImplementedError(f"the {self.name} adapter has no benchmark prompts")

    def benchmark_prompt(self, model: nn.Module, inputs: dict, before: bool, timed: Callable):
        """(vision seconds, prefill keywords, positions of decode step i) of ``inputs`` for the model as it is
        now; ``before``: it reduces before the language model (timed, with ``timed``, as the vision part)."""
        raise NotImplementedError(f"the {self.name} adapter has no benchmark prompts")


class BeforeOrInLmAdapter(VlmAdapter):
    """The adapter of a family reduced before its language model or inside it (Gemma 3, InternVL, SmolVLM, Qwen-VL;
    its mixin is a :class:`ReducingBeforeOrInLm`). A family names its parts: ``reducing`` (its mixin), ``received``
    and ``bench`` (its modules: the tower attention a reducer reads before the LM, the benchmark prompts),
    ``visuals`` (its in-LM :class:`~vtr.adapters.vlm.visuals.Visuals`), ``family_cost`` (its
    :class:`EncoderCost`); the words of its messages (``label``, ``unit``: what ``budget=`` counts per,
    ``features``: what ``metric='x'`` compares, ``inputs``: what a call takes); and ``reference_tokens``, the visual
    tokens of the image its schedules and analytic counts describe."""

    label = ""
    unit = "image"
    features = "features"
    inputs = "a prompt (input_ids with image tokens) as well as pixel_values"
    reducing: type = ReducingBeforeOrInLm
    received = None
    bench = None
    visuals: type = None
    family_cost: Callable[..., EncoderCost] = None

    def reference_tokens(self, model: nn.Module) -> int:
        raise NotImplementedError

    def cost(self, model: nn.Module, metric: str = "x") -> EncoderCost:
        return self.family_cost(model, metric)

    def blocks(self, model: nn.Module) -> nn.Module:
        """The language model's decoder layers: where the visual tokens cost."""
        return decoder(model).layers

    def default_input(self, model: nn.Module, batch: int = 1, device="cpu") -> Tensor:
        raise ValueError(f"cannot make an input for {type(model).__name__}: it takes {self.inputs}; pass inputs=")

    def refuse_amounts(self, r, keep, flops) -> None:
        """``r=``, ``keep=`` and ``flops=`` are a ViT's: a VLM family takes ``budget=``."""
        others = [k for k, v in (("r", r), ("keep", keep), ("flops", flops)) if v is not None]
        if others:
            raise ValueError(f"the {self.label} adapter takes budget= (visual tokens kept per {self.unit}), not "
                             f"{', '.join(o + '=' for o in others)}")

    def make_schedule(self, model: nn.Module, reducer: Reducer, *, r=None, keep=None, flops=None, layers=None,
                      metric: str = "x", budget=None, frames: Optional[str] = None,
                      temporal: Optional[float] = None) -> Schedule:
        """``budget=`` (visual tokens kept per image, or per tile) as reduction steps on the reference tokens; a
        family of images only (its video options refused)."""
        self.refuse_amounts(r, keep, flops)
        if frames is not None or temporal is not None:
            raise ValueError(f"the {self.label} adapter takes images only: leave out frames= and temporal=")
        return self.schedule(model, reducer, self.plan(layers=layers, budget=budget))

    def schedule(self, model: nn.Module, reducer: Reducer, plan: VisualPlan) -> Schedule:
        return visual.schedule(reducer, plan, num_tokens=self.reference_tokens(model),
                               num_layers=len(self.blocks(model)), any_size=True, family=self.label)

    def expected_flops(self, model: nn.Module, reduction: Optional[Reduction]) -> tuple[float, float]:
        """(reduced, unreduced) language-model prefill MACs of the reference image's visual tokens alone (no text),
        the reducer's own decisions included; the vision tower is the same either way."""
        stages = in_llm.stages_of(model)
        if reduction is not None and stages is not None:
            return in_llm.expected_flops(model, reduction, stages)
        received = 0.0 if reduction is None else self.received_macs(model, reduction)
        return items.expected_flops(model, reduction, self.cost(model), received)

    def received_macs(self, model: nn.Module, reduction: Reduction) -> float:
        """The tower attention pass a reducer reads before the language model, per reference image."""
        return self.received.expected_macs(model, reduction)

    def patch(self, model: nn.Module, reduction: Reduction) -> None:
        reduction = steps.dropping_as_published(reduction)   # fuse="nearest" is measured on vision encoders only
        if reduction.metric != "x":
            raise ValueError(f"the {self.label} adapter compares visual tokens by their {self.features}: "
                             "use metric='x'")
        if reduction.visual.in_llm:
            self.check_in_llm(model, reduction)
            in_llm.install(model, reduction, self.visuals())
        else:
            self.install_before_lm(model, reduction)
        model._vtr = reduction
        swap_class(model, self.reducing)

    def check_in_llm(self, model: nn.Module, reduction: Reduction) -> None:
        """What the family refuses of in-LM pruning, at patch time (nothing, by default)."""

    def install_before_lm(self, model: nn.Module, reduction: Reduction) -> None:
        self.received.install(model, reduction)

    def unpatch(self, model: nn.Module) -> None:
        in_llm.uninstall(model)
        self.received.uninstall(model)
        restore_class(model)
        del model._vtr

    def benchmark_workload(self, model: nn.Module, *args) -> tuple:
        return self.bench.workload(model, *args)

    def benchmark_prompt(self, model: nn.Module, inputs: dict, before: bool, timed: Callable):
        return self.bench.prompt(model, inputs, before, timed)
