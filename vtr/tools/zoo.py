"""The model zoo as a tool: build an entry's model (random weights), describe entries, find presets.

Entries and presets themselves live in :mod:`vtr.model_zoo`. A new family adds a builder to
:data:`BUILDERS` (a function ``(name, kwargs) -> model``) and its TOML files.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..model_zoo import AMOUNTS, Entry, entries, get, shape_of
from .fidelity import Task, Training, build_model
from .models import create_model


def build(entry: Entry, **overrides) -> nn.Module:
    """The entry's model with random weights (in eval mode)."""
    if entry.builder not in BUILDERS:
        raise ValueError(f"zoo entry {entry.name!r} uses builder {entry.builder!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[entry.builder](entry.model_name, {**entry.model_kwargs, **overrides}).eval()


def _build_timm(name: str, kwargs: dict) -> nn.Module:
    import timm
    return timm.create_model(name, pretrained=False, **kwargs)


def _build_fidelity(name: str, kwargs: dict) -> nn.Module:
    return build_model(Task(), Training(**kwargs))


def _build_named(family: str) -> Callable[[str, dict], nn.Module]:
    def build(name: str, kwargs: dict) -> nn.Module:
        return create_model(f"{family}:{name}", **kwargs)
    return build


BUILDERS: dict[str, Callable[[str, dict], nn.Module]] = {
    "timm": _build_timm,
    "open_clip": _build_named("open_clip"),   # the image tower of open_clip.create_model(name)
    "hf": _build_named("hf"),                 # a transformers vision tower from vtr.models.HF_VISION
    "vtr-fidelity": _build_fidelity,
}


def describe(entry: Entry) -> str:
    amount = ", ".join(f"{k}={entry.reduction[k]}" for k in AMOUNTS if k in entry.reduction)
    return f"{entry.name:<36} {entry.reduction['method']:<8} {amount:<12} {entry.description}"


def find(model: nn.Module) -> list[Entry]:
    """Entries whose expected shape matches ``model`` (a guide to what preset to use)."""
    try:
        shape = shape_of(model)
    except Exception:
        return []
    return [e for e in entries().values() if e.expect and all(shape.get(k) == v for k, v in e.expect.items())]
