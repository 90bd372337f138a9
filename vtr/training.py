"""What fine-tuning a patched model needs besides the model: the unreduced teacher (:func:`disabled`),
which parameters train (:func:`trainable`), and a pass's keep decisions for the keep-ratio loss
(:func:`decisions`). Switches are per thread (context variables), never attributes of the model."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .adapters import settings, thread_settings
from .core import run as runs
from .core.run import Decision

TRAINABLE = ("reducer", "all")


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Calls of ``model`` inside the block run unreduced, with the same weights, in this thread only:
    exactly what the unpatched model computes (no token state, no reducer, the original code path).
    The teacher for distillation without a second copy of the model::

        with vtr.disabled(model), torch.no_grad():
            teacher = model(images)

    After a call inside the block, ``vtr.report(model)`` says that the last call ran unreduced (an error)
    until the next reduced call.
    """
    with runs.switched_off(thread_settings(model)):
        yield model


def trainable(model: nn.Module, which: str) -> nn.Module:
    """Set what trains: ``"reducer"`` the learned reducer's parameters only (everything else frozen: the
    reducer-only recipe), ``"all"`` every parameter of the model. Returns ``model``."""
    if which not in TRAINABLE:
        raise ValueError(f"which must be one of {TRAINABLE} (the learned reducer alone, or every parameter), "
                         f"got {which!r}")
    reduction = settings(model)
    own = {id(p) for p in reduction.reducer.parameters()}
    if which == "reducer" and not own:
        raise ValueError(f"method {reduction.method!r} has no parameters to train; trainable(model, 'reducer') needs "
                         "a learned method (dynamicvit, sit) that reduces somewhere")
    for parameter in model.parameters():
        parameter.requires_grad_(which == "all" or id(parameter) in own)
    return model


@contextmanager
def decisions(model: nn.Module) -> Iterator[list[Decision]]:
    """Collect the training-time keep decisions of ``model``'s calls inside the block (this thread only),
    with their gradient, for :func:`vtr.losses.keep_ratio`::

        with vtr.decisions(model) as kept:
            logits = model(images)
        loss = criterion(logits, labels) + vtr.losses.keep_ratio(kept)

    Only reducers that mask in training (``dynamicvit``) make decisions; the list is dropped with the
    block, so no graph outlives the step.
    """
    with runs.collecting(thread_settings(model)) as found:
        yield found
