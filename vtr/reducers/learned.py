"""What learned reducers share: where they hold a module (one per reducing block) and the errors that
say so. Their parameters belong to the patched model (``vtr.patch`` registers the reducer on it as
``_vtr_reducer``), so they train, save, load, move and shard like the model's own weights."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import Reducer

INITS = ("random", "cls_attention")


def stages(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(layer, tokens in, tokens out)`` of every block whose count drops, from the counts entering each
    block and after the last."""
    return [(layer, n, m) for layer, (n, m) in enumerate(zip(counts[:-1], counts[1:])) if m < n]


def check_width(reducer: Reducer, width: int) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 2:
        raise ValueError(f"{reducer.name}: a learned reducer needs the token width of the model (an int >= 2), "
                         f"got {width!r}; this model family does not say it, so learned reducers cannot patch it")
    return width


def stage_module(reducer: Reducer, modules: nn.ModuleDict, layer: int) -> nn.Module:
    """The module of ``layer``, or an error that says how a learned reducer gets its modules."""
    key = str(layer)
    if key not in modules:
        built = ", ".join(modules) or "none"
        raise ValueError(f"{reducer.name}: no learned module for block {layer} (built for blocks: {built}); a learned "
                         "reducer is built for a model by vtr.patch, at the blocks its schedule reduces")
    return modules[key]
