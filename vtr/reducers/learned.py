"""What learned reducers share: where they hold a module (one per reducing block) and the errors that
say so. Their parameters belong to the patched model (``vtr.patch`` registers the reducer on it as
``_vtr_reducer``), so they train, save, load, move and shard like the model's own weights."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .base import Reducer

INITS = ("random", "cls_attention")


def stages(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(layer, tokens in, tokens out)`` of every block whose count drops, from the counts entering each
    block and after the last."""
    return [(layer, n, m) for layer, (n, m) in enumerate(zip(counts[:-1], counts[1:])) if m < n]


def before_last_block(layers: Optional[list[int]], num_layers: int) -> list[int]:
    """A learned reducer's default layers: never the last block (at least the one before it).

    What a learned step decides reaches the loss only through the blocks after it (a training decision
    is a mask that later blocks' attention reads; a slimmed token is read by the next block's attention),
    so a module at the last block would get no gradient, or a zero one, and never learn."""
    layers = list(range(num_layers)) if layers is None else layers
    return [layer for layer in layers if layer < num_layers - 1] or [max(num_layers - 2, 0)]


def learnable_stages(reducer: Reducer, counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """:func:`stages`, refusing a step at the last block (see :func:`before_last_block`)."""
    found = stages(counts)
    last = len(counts) - 2
    if any(layer == last for layer, _, _ in found):
        raise ValueError(f"{reducer.name}: this schedule reduces at block {last}, the model's last; a learned step there "
                         "reaches no later block, so it would never learn. Leave the last block out of layers= "
                         "(or of a per-layer r= / keep= list), or use the method's default layers")
    return found


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
