"""The adapter contract, the registry of model families, and the one class-swap helper.

An adapter teaches vtr one model family: which models it takes (``matches``), what it refuses
(``check``), what the encoder costs (``cost``), how to patch and unpatch it, where its block stack
is and what input it expects. Defaults cover a plain ViT encoder; an adapter overrides what differs.
Adapters never implement a reduction: they feed reducers the signals the model has and follow the
token state through the model.

Adding a family is one folder in the top-level ``adapters/`` plus one ``register(...)`` line in
``vtr/adapters/__init__.py`` (and its ``package-dir`` line in pyproject.toml).
"""
from __future__ import annotations

import importlib
from typing import ClassVar, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vtr.budget.cost import EncoderCost
from vtr.budget.schedule import RSpec, Schedule, make_schedule, reduced_macs
from vtr.core.plan import METRICS, Reduction
from vtr.reducers.base import Reducer

from .errors import UnsupportedModelError


class Adapter:
    """How vtr patches one model family. Subclass it, then register it (see the module docstring)."""

    name: ClassVar[str] = ""              # the family, as :func:`family` reports it
    amounts: ClassVar[tuple[str, ...]] = ()   # amounts of its own besides r/keep/flops (LLaVA: budget)
    metrics: ClassVar[tuple[str, ...]] = METRICS  # the metric= values it can feed reducers, default first
    learned_reducers: ClassVar[bool] = True   # takes learned reducers (its cost gives the token width)
    # Its models also serve as the vision towers of vision-language families (HF CLIP/SigLIP in LLaVA):
    # vtr.patch then refuses one that sits inside such a model (see vtr.api.check_not_inside_a_vlm).
    vision_tower_of_vlms: ClassVar[bool] = False

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` for anything whose forward the adapter would not reproduce."""

    def cost(self, model: nn.Module, metric: str = "x") -> EncoderCost:
        raise NotImplementedError

    def patch(self, model: nn.Module, reduction: Reduction) -> None:
        raise NotImplementedError

    def unpatch(self, model: nn.Module) -> None:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> nn.Module:
        """The stack of transformer blocks whose token counts the report follows."""
        raise NotImplementedError

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model expects by default."""
        raise NotImplementedError

    def default_input(self, model: nn.Module, batch: int = 1,
                      device: Union[str, torch.device] = "cpu") -> Tensor:
        """A random image batch of the default size, for profiling and benchmarks."""
        return torch.randn(batch, *self.input_size(model), device=device)

    def stage(self, layers) -> str:
        """Where this adapter runs a reducer given ``layers=`` (``Reducer.stages``): inside the encoder here."""
        return "tower"

    def default_stage_layers(self, model: nn.Module, reducer, layers):
        """``layers=`` as given, or where a method that cannot act at this adapter's default stage acts
        instead (a vision-language model: an in-LM-only method's own default layers)."""
        return layers

    def plan(self, layers=None, **amounts):
        """Typed settings of this family's own amounts (``amounts``), beside the schedule; None: it has none."""
        return None

    def make_schedule(self, model: nn.Module, reducer: Reducer, *, r: Optional[RSpec] = None,
                      keep=None, flops: Optional[float] = None, layers: Optional[Sequence[int]] = None,
                      metric: str = "x", **amounts) -> Schedule:
        """Per-layer amounts from the user's one amount, over this model's encoder."""
        return make_schedule(reducer, self.cost(model, metric), r=r, keep=keep, flops=flops, layers=layers)

    def expected_tokens(self, model: nn.Module, reduction: Reduction) -> list[int]:
        """Tokens entering each block (and after the last) at the default input size."""
        cost = self.cost(model, reduction.metric)
        return reduction.schedule.token_counts(reduction.reducer, cost.num_tokens, cost.num_protected)

    def expected_flops(self, model: nn.Module, reduction: Optional[Reduction]) -> tuple[float, float]:
        """Analytic (reduced, unreduced) MACs per image at the default input size."""
        if reduction is None:
            unreduced = self.cost(model).unreduced()
            return unreduced, unreduced
        cost = self.cost(model, reduction.metric)
        return reduced_macs(cost, reduction.reducer, self.expected_tokens(model, reduction)), cost.unreduced()


# -- the registry --------------------------------------------------------------------------------

class _Registered:
    """An adapter imported on first use: open_clip and transformers are slow to import, and a model
    can only be one of theirs if the library is already imported (its classes are in the MRO)."""

    def __init__(self, target: str, library: str, supports: str):
        self.target, self.library, self.supports = target, library, supports
        self._adapter: Optional[Adapter] = None

    def claims(self, model: nn.Module) -> bool:
        if not any(cls.__module__.split(".")[0] == self.library for cls in type(model).__mro__):
            return False
        return self.load().matches(model)

    def load(self) -> Adapter:
        if self._adapter is None:
            module, _, name = self.target.partition(":")
            self._adapter = getattr(importlib.import_module(module), name)()
        return self._adapter


_REGISTRY: dict[str, _Registered] = {}


def register(target: str, library: str, supports: str) -> None:
    """Register the adapter class ``"package.module:Class"`` for models built by ``library`` (the top-level
    package their classes come from); ``supports`` names what it takes, for error messages. Order does
    not matter: exactly one adapter may claim a model."""
    _REGISTRY[target] = _Registered(target, library, supports)


def registered() -> list[str]:
    """Adapter targets in registration order (``"module:Class"``)."""
    return list(_REGISTRY)


def find_adapter(model: nn.Module) -> Adapter:
    """The one adapter that claims ``model``; none is an UnsupportedModelError, several a bug."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    claiming = [entry.load() for entry in _REGISTRY.values() if entry.claims(model)]
    if len(claiming) > 1:
        raise RuntimeError(f"adapters {', '.join(a.name for a in claiming)} all claim "
                           f"{type(model).__name__}; an adapter's matches() must be specific")
    if not claiming:
        raise UnsupportedModelError(
            f"vtr cannot patch {type(model).__module__}.{type(model).__name__}; supported: "
            + "; ".join(entry.supports for entry in _REGISTRY.values()))
    return claiming[0]


# Wrappers that run the module they hold (``.module``) unchanged: the patched model is that module.
PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The model vtr patches inside a wrapper: peft's ``PeftModel`` (and its tuner, e.g. ``LoraModel``) wraps
    the model it adapts, whose LoRA-wrapped layers stay in place; ``DataParallel`` and
    ``DistributedDataParallel`` call their ``.module``. A user hands vtr whichever they hold, so every vtr
    function looks through them. Any other module is itself."""
    while True:
        if isinstance(model, PARALLEL_WRAPPERS):
            inner = model.module
        elif type(model).__module__.startswith("peft."):
            inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "model", None)
        else:
            break
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def family(model: nn.Module) -> Optional[str]:
    """The model family vtr sees in ``model`` (``"timm"``, ``"open_clip"``, ``"hf_vision"``, ``"llava"``, ``"qwen_vl"``,
    ``"gemma3"``, ``"smolvlm"``, ``"internvl"``), or None when no adapter takes it. The one place model families are
    told apart."""
    try:
        return find_adapter(unwrap(model)).name
    except (UnsupportedModelError, TypeError):
        return None


def is_patched(model: nn.Module) -> bool:
    """Whether vtr patched ``model`` (or the model inside its wrapper, see :func:`unwrap`)."""
    return isinstance(getattr(unwrap(model), "_vtr", None), Reduction)


def settings(model: nn.Module) -> Reduction:
    """The reduction a patched model (or the model inside its wrapper) applies; a clear error for a model vtr
    has not patched."""
    if not is_patched(model):
        raise ValueError("model is not patched by vtr; call vtr.patch(model, ...) first")
    return unwrap(model)._vtr


def thread_settings(model: nn.Module) -> Reduction:
    """:func:`settings`, for the switches and records that hold per thread (``vtr.report``, ``vtr.disabled``,
    ``vtr.decisions``, ``vtr.conditioned``). ``DataParallel`` over several devices runs its replicas in threads
    of its own, which those never reach (a teacher under ``vtr.disabled`` would run reduced without a word),
    so that is an error saying what works instead."""
    if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
        raise ValueError(f"DataParallel over {len(model.device_ids)} devices runs the model in threads of its own, "
                         "where vtr.report, vtr.disabled, vtr.decisions and vtr.conditioned (per thread) do not reach; "
                         "use DistributedDataParallel (one process per device), or DataParallel on one device")
    return settings(model)


# -- the one class-swap helper -------------------------------------------------------------------

class Swapped:
    """Base of every class vtr mixes into a module: pickles and deep-copies as (mixin, original class),
    so a patched model round-trips through ``pickle``/``torch.save`` and stays patched."""

    _vtr_mixin: ClassVar[type]
    _vtr_original: ClassVar[type]

    def __reduce_ex__(self, protocol):
        _, _, *rest = super().__reduce_ex__(protocol)
        cls = type(self)
        return (_new_swapped, (cls._vtr_mixin, cls._vtr_original), *rest)


_SWAPPED: dict[tuple[type, type], type] = {}


def swapped_class(mixin: type, cls: type) -> type:
    """The class ``(mixin, cls)``, made once per pair."""
    if not issubclass(mixin, Swapped):
        raise TypeError(f"{mixin.__name__} must derive from vtr.adapters.base.Swapped")
    key = (mixin, cls)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"Vtr{cls.__name__}", (mixin, cls),
                             {"_vtr_mixin": mixin, "_vtr_original": cls, "__module__": mixin.__module__})
    return _SWAPPED[key]


def _new_swapped(mixin: type, cls: type) -> nn.Module:
    return object.__new__(swapped_class(mixin, cls))


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the class ``(mixin, its class)`` in place: weights, hooks and ``state_dict`` stay."""
    if isinstance(module, Swapped):
        raise RuntimeError(f"{type(module).__name__} is already patched by vtr")
    module.__class__ = swapped_class(mixin, type(module))


def restore_class(module: nn.Module) -> None:
    """Undo :func:`swap_class` (a module that was never swapped is left alone)."""
    if isinstance(module, Swapped):
        module.__class__ = type(module)._vtr_original


def remove_hooks(module: nn.Module, kind: type) -> None:
    """Remove every forward hook and forward pre-hook of type ``kind`` from ``module`` and its submodules."""
    for sub in module.modules():
        for hooks, extras in ((sub._forward_hooks, (sub._forward_hooks_with_kwargs, sub._forward_hooks_always_called)),
                              (sub._forward_pre_hooks, (sub._forward_pre_hooks_with_kwargs,))):
            for key in [k for k, hook in hooks.items() if isinstance(hook, kind)]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)
