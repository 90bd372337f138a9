"""What every adapter shares: the reduction step, the query check, the report, MAC helpers.

The step takes q/k as arguments so each adapter can get them the cheapest way its attention
allows (its own projections, a ``QKCapture`` on q/k norms, or the attention-interface registry).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from vtr.config import Reduction, Report
from vtr.reducers import Signals
from vtr.signals import cls_attention
from vtr.state import TokenState


def wants_cls_attention(reduction: Reduction) -> bool:
    """True when the reducer reads the CLS attention row and the model has a CLS token."""
    return "cls_attention" in reduction.reducer.needs and reduction.has_cls


def needs_qk(reduction: Reduction) -> bool:
    """True when a reducing layer must see the attention's q and k (keys metric, CLS attention)."""
    return reduction.metric == "keys" or wants_cls_attention(reduction)


def num_kept(reduction: Reduction, state: TokenState, layer: int) -> int:
    n, protected = state.num_tokens, state.num_protected
    return reduction.schedule.num_kept(layer, n, protected, reduction.reducer.max_removable(n, protected))


def reduce(reduction: Reduction, state: TokenState, x: Tensor, layer: int, num_layers: int, *,
           before_attention: bool = False,
           q: Optional[Tensor] = None, k: Optional[Tensor] = None, bias: Optional[Tensor] = None,
           scale: Optional[float] = None, grid: Optional[tuple] = None, query: Optional[Tensor] = None,
           query_projection: Optional[Callable[[Tensor], Tensor]] = None) -> TokenState:
    """The block's reduction step on ``x``.

    Adapters call it twice per block: with ``before_attention=True`` on the block's input, and after
    the attention residual; the reducer acts in the one its ``acts_before_blocks`` names (ATF filters
    a block's input, everything else sits between attention and MLP).
    ``q``/``k`` ``[B, H, N, D]`` are the attention's query and key after any norm (needed only when
    :func:`needs_qk`); ``bias`` the key bias the attention used, ``scale`` its logit scale. Before the
    attention there are none: the metric is then the hidden states and there is no CLS attention.
    """
    if before_attention != reduction.reducer.acts_before_blocks:
        return state.with_x(x)
    kept = num_kept(reduction, state, layer)
    if kept == state.num_tokens:
        return state.with_x(x)
    metric = k.mean(dim=1) if reduction.metric == "keys" and k is not None else x  # keys: head mean [B, N, D]
    attention = None
    if wants_cls_attention(reduction) and q is not None:
        attention = cls_attention(q, k, bias, scale)
    signals = Signals(metric=metric, layer=layer, num_layers=num_layers, cls_attention=attention,
                      query=query, grid=None if state.is_reduced else grid,
                      query_projection=query_projection)
    return reduction.reducer(state.with_x(x), kept, signals)


def batch_query(reduction: Reduction, batch: int, width: Optional[int], where: str) -> Optional[Tensor]:
    """The query set by ``vtr.conditioned`` for this batch: a batch-1 query is shared by every image.

    ``width`` is the embedding width the adapter maps tokens to (the CLIP embedding); a query of
    another width is an error here, before any work is done.
    """
    query = reduction.query
    if query is None:
        return None
    if query.shape[0] not in (1, batch):
        raise ValueError(f"query must have one row per image (batch {batch}) or a single row shared by all "
                         f"images, got {tuple(query.shape)}")
    if width is None:
        raise ValueError(f"{where} has no per-token projection into an embedding space, so it cannot be "
                         "conditioned on a query")
    if query.shape[-1] != width:
        raise ValueError(f"query width must be {width} (the embedding width of {where}), got "
                         f"{query.shape[-1]} in a query of shape {tuple(query.shape)}")
    return query.expand(batch, *query.shape[1:])


def grid_of(rows_cols: tuple, num_prefix: int, num_tokens: int) -> Optional[tuple]:
    rows, cols = rows_cols
    return (int(rows), int(cols)) if rows * cols + num_prefix == num_tokens else None


def record(reduction: Reduction, state: TokenState, tokens: list, grid: Optional[tuple]) -> None:
    """Keep the final state for the pooling head of the same pass and the report of what happened."""
    reduction.final_state = state
    reduction.report = Report(tokens=list(tokens), assignment=state.assignment.detach(),
                              size=state.size.detach(), num_protected=state.num_protected, grid=grid)


def key_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """``log(size)`` as a ``[B, N]`` additive key bias for pooling attention (size 0 -> -inf)."""
    return size.log().to(dtype)


def linear_macs(module: torch.nn.Module) -> float:
    """MACs per token of every ``nn.Linear`` inside ``module``."""
    return float(sum(m.in_features * m.out_features for m in module.modules()
                     if isinstance(m, torch.nn.Linear)))


def checkpointed(step: Callable, *args, enabled: bool):
    """Run one block step under activation checkpointing when the model asks for it."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
    return step(*args)
