"""Reducing one set of visual tokens to a budget, in as many reducer steps as the budget needs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vtr.budget.visual import reduction_steps, step_counts
from vtr.core.plan import Reduction
from vtr.core.signals import Signals
from vtr.core.state import TokenState


def reduce_group(reduction: Reduction, features: Tensor, budget: int, num_protected: int = 0, *,
                 attention: Optional[Tensor] = None, query: Optional[Tensor] = None,
                 grid: Optional[tuple] = None, received: Optional[Tensor] = None,
                 keys: Optional[Tensor] = None) -> tuple[TokenState, list[int]]:
    """Reduce ``features [G, N, D]`` (G token sets of one size) to ``budget`` tokens each.

    Takes as many steps as the reducer's ``max_step`` needs (:func:`reduction_steps`); ``attention``
    ``[G, N]`` is the CLS attention to the original tokens, ``received`` ``[G, N]`` the attention each receives
    (a tower without a CLS token), ``keys`` ``[G, N, d]`` their attention keys in the tower (head mean), ``grid``
    their (rows, cols). Returns the
    state and the token count entering each step, then the count kept.
    """
    return reduce_state(reduction, TokenState.start(features, num_protected), budget, attention=attention,
                        query=query, grid=grid, received=received, keys=keys)


def reduce_state(reduction: Reduction, state: TokenState, budget: int, *, attention: Optional[Tensor] = None,
                 query: Optional[Tensor] = None, grid: Optional[tuple] = None,
                 received: Optional[Tensor] = None, keys: Optional[Tensor] = None) -> tuple[TokenState, list[int]]:
    """:func:`reduce_group` from a state that may already be reduced (its sizes weigh its merges): the steps run on
    its current tokens, then compose with its provenance. ``attention``, ``received`` ``[G, n]``: of the current tokens;
    ``grid``: their (rows, cols) if they are one's untouched patches."""
    steps = reduction_steps(state.num_tokens, budget, reduction.reducer, state.num_protected)
    tokens = step_counts(state.num_tokens, steps)
    if not steps:
        return state, tokens
    current = state.restarted()
    for step, remove in enumerate(steps):
        signals = Signals(
            metric=current.x, layer=step, num_layers=len(steps),
            cls_attention=None if attention is None else carried(attention, current),
            query=query, grid=None if current.is_reduced else grid,
            attention_received=None if received is None else carried(received, current),
            keys=None if keys is None else carried_mean(keys, current),
        )
        current = reduction.reducer(current, current.num_tokens - remove, signals)
    return state.then(current), tokens


def carried(attention: Tensor, state: TokenState) -> Tensor:
    """Attention to each current token: the sum over the original tokens it carries."""
    if not state.is_reduced:
        return attention
    index = state.assignment.clamp_min(0)
    weights = attention.float() * (state.assignment >= 0)
    return weights.new_zeros(state.size.shape).scatter_add_(1, index, weights)


def carried_mean(values: Tensor, state: TokenState) -> Tensor:
    """``[G, n, d]`` per current token, the mean of the original tokens' ``values`` ``[G, N, d]`` it carries."""
    if not state.is_reduced:
        return values
    index = state.assignment.clamp_min(0)[..., None].expand_as(values)
    present = (state.assignment >= 0)[..., None].to(values.dtype)
    shape = (*state.size.shape, values.shape[-1])
    total = values.new_zeros(shape).scatter_add_(1, index, values * present)
    count = values.new_zeros(shape[:2] + (1,)).scatter_add_(1, index[..., :1], present)
    return total / count.clamp_min(1)


def padded(rows: list[Tensor], fill) -> Tensor:
    """Per-image 1-D tensors as one ``[I, longest]`` tensor, ``fill`` past each one's end."""
    width = max((len(r) for r in rows), default=0)
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=fill) for r in rows]) if rows \
        else torch.zeros(0, 0)


def in_source_order(state: TokenState) -> tuple[TokenState, Tensor]:
    """The same tokens reordered by the first original token each carries, and those firsts ``[G, K]``.

    Reducers may emit tokens in any order (bipartite merging emits one set, then the other); a language
    model that gives visual tokens positions by where they came from reads them best in that order.
    """
    first = state.first_carried()
    first, order = first.sort(dim=1, stable=True)
    rank = order.argsort(dim=1)                       # new index of each current token
    assignment = torch.where(state.assignment >= 0, rank.gather(1, state.assignment.clamp_min(0)), -1)
    x = state.x.gather(1, order[..., None].expand_as(state.x))
    return TokenState(x=x, size=state.size.gather(1, order), assignment=assignment,
                      num_protected=state.num_protected, padded=state.padded), first
