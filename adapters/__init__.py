"""Adapters: patch a model family in place so its encoder runs on a token state.

Each adapter module provides ``name``, ``matches(model)``, ``check(model)``, ``cost(model, metric)``,
``patch(model, reduction)`` and ``unpatch(model)``. Adapters never implement a reduction; they feed
reducers the signals the model has and follow the token state through the model.
"""
from __future__ import annotations

from types import ModuleType

from torch import nn

from . import llava, timm_vit
from .errors import UnsupportedModelError

ADAPTERS: list[ModuleType] = [timm_vit, llava]


def find_adapter(model: nn.Module) -> ModuleType:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(
        f"vtr cannot patch {type(model).__module__}.{type(model).__name__}; supported: "
        + ", ".join(a.name for a in ADAPTERS)
    )


__all__ = ["ADAPTERS", "find_adapter", "UnsupportedModelError"]
