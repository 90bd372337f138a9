"""The model zoo: supported configurations with their recommended reduction and measured figures.

Entries are the TOML files in the repository's top-level ``model_zoo/`` folder, installed as the
package data of ``vtr.model_zoo.entries`` (no Python there, so nothing in the checkout is importable
under a name another distribution could own). One file per entry:

    name = "timm/vit_base_patch16_224"      # what vtr.patch(model, preset=...) takes
    description = "..."
    [model]        builder = "timm", name = ..., kwargs = {...}   # how to build it (random weights)
    [expect]       num_tokens, num_layers, width                 # what the model must look like
    [reduction]    method, one of flops / r / keep, options ...  # what the preset applies
    [measured]     figures measured here, each with how          # free-form, shown by `vtr zoo`

This module reads entries and turns a preset into ``vtr.patch`` arguments; building an entry's
model and listing the zoo are tools (``vtr.tools.zoo``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .._data import data_folder
from ..adapters import find_adapter

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ENTRIES = "vtr.model_zoo.entries"   # the top-level model_zoo/ folder, installed as package data
AMOUNTS = ("r", "keep", "flops")
REDUCTION_KEYS = ("method", *AMOUNTS, "layers", "metric", "prop_attn", "options")


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    builder: str
    model_name: str
    model_kwargs: dict
    expect: dict
    reduction: dict
    measured: dict = field(default_factory=dict)
    source: str = ""  # file the entry came from


def _parse(text: str, source: str) -> Entry:
    data = tomllib.loads(text)
    missing = [key for key in ("name", "model", "reduction") if key not in data]
    if missing:
        raise ValueError(f"model zoo file {source}: missing {', '.join(missing)}")
    reduction = data["reduction"]
    unknown = sorted(set(reduction) - set(REDUCTION_KEYS))
    if unknown or "method" not in reduction:
        raise ValueError(f"model zoo file {source}: [reduction] needs 'method' and takes only "
                         f"{', '.join(REDUCTION_KEYS)}; got unknown {', '.join(unknown) or 'none'}")
    if sum(key in reduction for key in AMOUNTS) > 1:
        raise ValueError(f"model zoo file {source}: [reduction] gives more than one of r, keep, flops")
    model = data["model"]
    return Entry(name=data["name"], description=data.get("description", ""), builder=model["builder"],
                 model_name=model.get("name", ""), model_kwargs=model.get("kwargs", {}),
                 expect=data.get("expect", {}), reduction=reduction, measured=data.get("measured", {}),
                 source=source)


def entries() -> dict[str, Entry]:
    """Every zoo entry by name."""
    folder = data_folder(ENTRIES, "model_zoo")
    found: dict[str, Entry] = {}
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            entry = _parse(item.read_text(encoding="utf-8"), item.name)
            if entry.name in found:
                raise ValueError(f"model zoo: {entry.name!r} is defined in {found[entry.name].source} and {item.name}")
            found[entry.name] = entry
    return found


def get(name: str) -> Entry:
    available = entries()
    if name not in available:
        raise ValueError(f"unknown preset {name!r}; the model zoo has: {', '.join(sorted(available))}")
    return available[name]


def shape_of(model: nn.Module) -> dict:
    """What a zoo entry's [expect] compares: tokens, layers and width of the model's encoder."""
    cost = find_adapter(model).cost(model)
    return {"num_tokens": cost.num_tokens, "num_layers": cost.num_layers, "width": cost.attn_dim}


def preset_arguments(name: str, model: nn.Module, given: dict) -> dict:
    """Keyword arguments for :func:`vtr.patch`: the preset's, overridden by what the caller gave.

    ``given`` holds the caller's arguments (None = not given; ``options`` a dict). An amount given
    by the caller replaces the preset's amount. The model must have the shape the entry expects.
    """
    entry = get(name)
    if entry.expect:
        shape = shape_of(model)
        wrong = {k: (v, shape.get(k)) for k, v in entry.expect.items() if shape.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}={got} (preset expects {want})" for k, (want, got) in wrong.items())
            raise ValueError(f"preset {name!r} does not fit this model: {detail}")
    preset = dict(entry.reduction)
    if any(given.get(key) is not None for key in AMOUNTS):
        for key in AMOUNTS:
            preset.pop(key, None)
    options = {**preset.pop("options", {}), **(given.pop("options", None) or {})}
    arguments = {**preset, **{k: v for k, v in given.items() if v is not None}}
    return {**arguments, **options}
