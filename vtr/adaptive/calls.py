"""Per-thread switches of adaptive-computation methods: the complete model (every token computed, the
teacher of DyT's self-distillation) and the collection of a pass's dispatch decisions for the rate loss.
Context variables, never attributes of the model, so concurrent callers never see each other's."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Optional

from torch import Tensor, nn

_COMPLETE: ContextVar[frozenset] = ContextVar("vtr_adaptive_complete", default=frozenset())
_COLLECT: ContextVar[Optional[dict]] = ContextVar("vtr_adaptive_collect", default=None)
_KEPT: ContextVar[Optional[dict]] = ContextVar("vtr_adaptive_kept", default=None)


@dataclass(frozen=True)
class Dispatch:
    """One block's decisions in one pass: ``keep`` ``[B, N]`` (1 or True: the block computed the token; the
    protected leading tokens always), with its straight-through gradient in training; ``rate`` the
    activation rate the method aims at; ``num_protected`` leading tokens always kept."""

    layer: int
    keep: Tensor
    rate: float
    num_protected: int


@dataclass(frozen=True)
class Trim:
    """One block's trimming in one pass (SmartTrim): ``tokens`` ``[B, N]`` kept after its token trimmer (1), ``heads``
    ``[B, H]`` kept heads, ``spent`` ``[B]`` the block's cost relative to the untrimmed block (differentiable in
    training), ``target`` the cost the method aims at."""

    layer: int
    tokens: Tensor
    heads: Tensor
    spent: Tensor
    target: float


@dataclass(frozen=True)
class GateChoice:
    """One pass of MSViT's gate: ``probabilities`` ``[B, regions]`` that each region needs its fine tokens
    (differentiable in training, for the batch-shaping loss), ``fine`` ``[B, regions]`` the choice made (1 or True:
    fine; straight-through in training), ``rate`` the target share of fine regions, ``tokens`` ``[B]`` each row's
    token count (prefix included)."""

    probabilities: Tensor
    fine: Tensor
    rate: float
    tokens: Tensor


def record_gate(owner: nn.Module, probabilities: Tensor, fine: Tensor) -> None:
    found = (_COLLECT.get() or {}).get(owner)
    if found is not None:
        extra = (owner.coarse ** 2 - 1) * fine.detach().float().sum(1)
        tokens = owner.num_prefix + owner.num_regions + extra
        found.append(GateChoice(probabilities, fine, owner.rate, tokens.round().long()))


def record_trim(owner: nn.Module, layer: int, tokens: Tensor, heads: Tensor, spent: Tensor) -> None:
    found = (_COLLECT.get() or {}).get(owner)
    if found is not None:
        found.append(Trim(layer, tokens, heads, spent, owner.flops))


def record_entry(owner: nn.Module, found) -> None:
    """A CLCA cache entry (:class:`vtr.adaptive.clca.CacheEntry`) of this pass, for ``vtr.adaptive.decisions``."""
    collected = (_COLLECT.get() or {}).get(owner)
    if collected is not None:
        collected.append(found)


@contextmanager
def kept_tokens(owner: nn.Module) -> Iterator[None]:
    """One forward pass: the tokens kept so far travel from block to block here, and are dropped after it."""
    table = dict(_KEPT.get() or {})
    table[owner] = [None]
    token = _KEPT.set(table)
    try:
        yield
    finally:
        _KEPT.reset(token)


def current_kept(owner: nn.Module) -> Optional[Tensor]:
    cell = (_KEPT.get() or {}).get(owner)
    return None if cell is None else cell[0]


def set_kept(owner: nn.Module, kept: Tensor) -> None:
    cell = (_KEPT.get() or {}).get(owner)
    if cell is not None:
        cell[0] = kept


def complete(owner: nn.Module) -> bool:
    return owner in _COMPLETE.get()


@contextmanager
def completed(owner: nn.Module) -> Iterator[None]:
    token = _COMPLETE.set(_COMPLETE.get() | {owner})
    try:
        yield
    finally:
        _COMPLETE.reset(token)


def record(owner: nn.Module, layer: int, keep: Tensor) -> None:
    found = (_COLLECT.get() or {}).get(owner)
    if found is not None:
        found.append(Dispatch(layer, keep, owner.rate, owner.num_protected))


@contextmanager
def collecting(owner: nn.Module) -> Iterator[list]:
    found: list = []
    table = dict(_COLLECT.get() or {})
    table[owner] = found
    token = _COLLECT.set(table)
    try:
        yield found
    finally:
        _COLLECT.reset(token)
