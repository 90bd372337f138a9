"""Adapters: patch a model family in place so its encoder runs on a token state.

Each adapter module provides ``name``, ``matches(model)``, ``check(model)``, ``cost(model, metric)``,
``patch(model, reduction)`` and ``unpatch(model)``. Adapters never implement a reduction; they feed
reducers the signals the model has and follow the token state through the model.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Union

from torch import nn

from . import timm_vit
from .errors import UnsupportedModelError


class LazyAdapter:
    """An adapter module imported on first use: open_clip and transformers are slow to import, and a
    model can only be one of theirs if the library is already imported (its classes are in the MRO)."""

    def __init__(self, module: str, name: str, library: str):
        self.module, self.name, self.library = module, name, library
        self._loaded: ModuleType | None = None

    def matches(self, model: nn.Module) -> bool:
        if not any(cls.__module__.split(".")[0] == self.library for cls in type(model).__mro__):
            return False
        return self.load().matches(model)

    def load(self) -> ModuleType:
        if self._loaded is None:
            self._loaded = importlib.import_module(f"{__name__}.{self.module}")
        return self._loaded

    def __getattr__(self, attribute: str):
        return getattr(self.load(), attribute)


ADAPTERS: list[Union[ModuleType, LazyAdapter]] = [
    timm_vit,
    LazyAdapter("open_clip_vit", "open_clip", "open_clip"),
    LazyAdapter("llava", "transformers LLaVA", "transformers"),
    LazyAdapter("hf_vision", "transformers (CLIP, SigLIP, ViT)", "transformers"),
]


def find_adapter(model: nn.Module) -> Union[ModuleType, LazyAdapter]:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(
        f"vtr cannot patch {type(model).__module__}.{type(model).__name__}; supported: "
        + ", ".join(a.name for a in ADAPTERS)
    )


__all__ = ["ADAPTERS", "find_adapter", "UnsupportedModelError", "LazyAdapter"]
