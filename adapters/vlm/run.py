"""The per-call run of a patched vision-language model."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

from torch import nn

from vtr.core import run as runs
from vtr.core.run import Run


@dataclass(eq=False)
class VlmRun(Run):
    """One call of a patched vision-language model: a ``forward``, or a whole ``generate()`` (prefill and
    every decode step share it, so they share what the prefill decided).

    Besides what :class:`vtr.core.run.Run` holds (the call's query from ``vtr.conditioned``, the vision
    tower's q/k kept by ``KeepQK`` hooks), in-LLM pruning keeps its pruning of the prompt here
    (``vtr.adapters.vlm.pruning.Pruning``), and ``vision`` what ``generate()`` was given about its images
    that its forwards no longer see (it pre-encodes them and drops Qwen-VL's grids). Dropped when the call ends; only the detached report outlives it.
    """

    pruning: Optional[object] = None
    vision: dict = field(default_factory=dict)   # what generate() was given that its forwards may not see


@contextmanager
def opened(model: nn.Module) -> Iterator[VlmRun]:
    """The run of this call of ``model``: the one already open (a forward inside ``generate()``), or a new one."""
    reduction = model._vtr
    run = runs.active(reduction)
    if isinstance(run, VlmRun):
        yield run
        return
    run = VlmRun(reduction, query=runs.query_of(reduction))
    try:
        with runs.bound(run):
            yield run
    finally:
        run.captured.clear()
        run.pruning = None
        run.vision = {}
