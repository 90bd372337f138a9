"""Calibration of ATF's static prior: the CLS attention each patch position receives on real images.

A tool, not a reducer: it runs the model (through the adapter contract) with a recorder in the
reducer's place, so the reducer layer never depends on adapters or the API.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..adapters import find_adapter, is_patched, settings
from ..api import patch, unpatch
from ..budget.schedule import Schedule, chosen_layers
from ..core.plan import Reduction
from ..core.state import TokenState
from ..reducers.base import Reducer, Signals
from ..reducers.select import attention_scores


class _AttentionRecorder(Reducer):
    """Calibration only: records the score a dropping reducer would see, removes nothing."""

    name = "atf-calibration"
    needs = frozenset({"cls_attention"})

    def __init__(self) -> None:
        super().__init__()
        self.total: Optional[Tensor] = None

    def forward(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        score = attention_scores(self, state, signals).sum(dim=0).detach()
        self.total = score if self.total is None else self.total + score
        return state


@torch.no_grad()
def calibrate(model: nn.Module, images: Tensor, layers: Optional[Sequence[int]] = None,
              batch_size: int = 32) -> Tensor:
    """Static prior for :class:`ATF`: the CLS attention each patch position receives, averaged over
    ``images`` ``[M, 3, H, W]`` and ``layers`` (default: all blocks), normalized to sum to 1.

    The model must be unpatched or patched with ``"none"`` (the prior describes the unreduced
    model; a 'none' patch is restored afterwards). Models without a CLS token use the same fallback
    score as the dropping reducers. Returns ``[P]``, one value per patch position in token order.
    """
    was_none = is_patched(model) and settings(model).reducer.identity
    if is_patched(model) and not was_none:
        raise ValueError(f"atf.calibrate needs an unpatched model (or one patched with 'none'); this one is "
                         f"patched with {settings(model).describe()}: call vtr.unpatch(model) first")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty tensor [M, 3, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if was_none:
        unpatch(model)
    adapter = find_adapter(model)
    adapter.check(model)
    num_layers = adapter.cost(model).num_layers
    chosen = chosen_layers(layers, num_layers)
    recorder = _AttentionRecorder()
    # r=1 at the chosen layers makes the adapter call the recorder there; it removes nothing.
    schedule = Schedule("r", tuple(int(i in chosen) for i in range(num_layers)))
    adapter.patch(model, Reduction(method=recorder.name, reducer=recorder, schedule=schedule))
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size])
    finally:
        unpatch(model)
        if was_none:
            patch(model, "none")
    prior = recorder.total.float()
    return prior / prior.sum().clamp_min(torch.finfo(torch.float32).tiny)
