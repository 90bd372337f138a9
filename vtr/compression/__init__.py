"""Compression modules: parts added to a vision-language model that give its language model fewer visual tokens
(``vtr.compress(model, name, ...)``), beside the training-free reducers of ``vtr.patch`` (``vtr.methods()``).

- ``"tokenpacker"``: TokenPacker's coarse-to-fine projector in place of LLaVA's ``multi_modal_projector``
  (:mod:`.tokenpacker`); it must be trained (:func:`train_projector`).
- ``"granularity"``: AVG-LLaVA's adaptive granularity: pooling levels and a router per image and question
  (:mod:`.granularity`); the ``"relevance"`` router is training-free, the ``"learned"`` one trains with RGLF
  (:func:`train_router`).

``vtr.compressions()`` lists them, ``vtr.report(model)`` says what the last call did per image (which level each
image got), ``vtr.unpatch(model)`` removes a compression. Models: transformers' LLaVA-1.5 format
(``LlavaForConditionalGeneration``: both), LLaVA-NeXT (``LlavaNextForConditionalGeneration``, AnyRes crops: both;
:mod:`.anyres`) and Qwen2-VL / Qwen2.5-VL (granularity; :mod:`.qwen_vl`).
"""
from __future__ import annotations

import inspect

from torch import nn

from vtr.adapters.base import family, is_patched, settings, unwrap
from vtr.adapters.errors import UnsupportedModelError

from . import llava, module, qwen_vl
from .module import COMPRESSION, CompressionReport, forced_level
from .recipe import answer_losses, train_projector, train_router

COMPRESSIONS = {
    "tokenpacker": "TokenPacker projector: s x s patches packed into one token by region-to-point attention over "
                   "multi-level features (trained; LLaVA, LLaVA-NeXT)",
    "granularity": "AVG-LLaVA adaptive granularity: pooling levels and a router per image and question "
                   "(relevance: training-free; learned: RGLF; LLaVA, LLaVA-NeXT and Qwen-VL)",
}
FAMILIES = {"llava": llava, "qwen_vl": qwen_vl}   # vtr.family(model) -> the module that compresses it


def compressions() -> dict[str, str]:
    """Compression module names with one-line descriptions, for ``vtr.compress(model, name, ...)``."""
    return dict(sorted(COMPRESSIONS.items()))


def compress(model: nn.Module, method: str, **options) -> nn.Module:
    """Add the compression module ``method`` to ``model`` in place (returns it); ``vtr.unpatch(model)`` removes it.

    ``"tokenpacker"``: ``scale`` (2 -> 1/4 of the visual tokens, 3 -> 1/9), ``layers`` (the vision hidden states
    its keys and values read; default: TokenPacker's 12, 16, 22, 23 of 24 scaled to the tower), ``width``,
    ``heads``. ``"granularity"``: ``levels`` (pooling factors, default ``(1, 2, 4)``), ``router``
    (``"relevance"`` or ``"learned"``), ``tolerance`` and ``temperature`` (the relevance router's).
    """
    wrapper, model = model, unwrap(model)
    if method not in COMPRESSIONS:
        raise ValueError(f"unknown compression {method!r}; choose one of: {', '.join(sorted(COMPRESSIONS))} "
                         "(token reducers go through vtr.patch: vtr.methods())")
    if is_compressed(model):
        raise ValueError(f"model is already compressed with {llava.compression_of(model).describe()}; call "
                         "vtr.unpatch(model) first")
    if is_patched(model):
        raise ValueError(f"model is patched with {settings(model).describe()}; call vtr.unpatch(model) before "
                         "compressing it")
    found = FAMILIES.get(family(model))
    if found is None:
        raise UnsupportedModelError(f"vtr.compress takes transformers' LlavaForConditionalGeneration (LLaVA-1.5 "
                                    f"format), LlavaNextForConditionalGeneration and Qwen2-VL / Qwen2.5-VL, got "
                                    f"{type(model).__name__}")
    found.check(model)
    build = getattr(found, method)
    accepted = [p for p in inspect.signature(build).parameters if p != "model"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"compression {method!r} takes no option {', '.join(unknown)}; its options: "
                         f"{', '.join(accepted)}")
    build(model, **options)
    return wrapper


def is_compressed(model: nn.Module) -> bool:
    """Whether ``vtr.compress`` added a compression module to ``model``."""
    model = unwrap(model)
    return isinstance(model, nn.Module) and COMPRESSION in model._modules


def uncompress(model: nn.Module) -> nn.Module:
    """Remove the compression module (``vtr.unpatch`` does this for a compressed model)."""
    wrapper, model = model, unwrap(model)
    module.compression_of(model)
    module.detach(model)
    return wrapper


def report(model: nn.Module) -> CompressionReport:
    """What this thread's last call with images did: per image its level and tokens before / after."""
    return module.last_report(unwrap(model))


__all__ = ["compress", "compressions", "is_compressed", "uncompress", "report", "forced_level", "CompressionReport",
           "train_projector", "train_router", "answer_losses"]
