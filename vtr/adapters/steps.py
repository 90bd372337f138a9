"""What every ViT-style adapter shares: the reduction step, the query check, running a block, MAC helpers.

The step takes q/k as arguments so each adapter can get them the cheapest way its attention
allows (its own projections, :class:`~vtr.core.run.KeepQK` hooks on q/k norms, or the
attention-interface registry).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_scalar

from vtr.core.plan import Reduction
from vtr.core.run import Decision, Run, bound
from vtr.core.signals import Signals, cls_attention
from vtr.core.state import TokenState


def num_kept(reduction: Reduction, state: TokenState, layer: int) -> int:
    """Tokens after ``layer``'s step; under training-time masking, counted from the count the masks aim at.

    A static count, also under ``torch.compile``: when a compiled function runs again with other
    settings (another method or amount patched into a model under one compiled wrapper, or a second
    patched model), dynamo's automatic dynamic shapes would make the settings that changed symbolic, and
    with them every token count after them: tracing a reducer on symbolic counts took minutes where a
    fresh compile takes seconds. ``guard_scalar`` makes the count a constant of the graph, guarded on the
    settings it came from (eager: the int itself). Under ``torch.jit.trace`` (fvcore's counter) sizes are
    traced tensors, left as they are.
    """
    n, protected = state.num_scheduled, state.num_protected
    count = reduction.schedule.num_kept(layer, n, protected, reduction.reducer.max_removable(n, protected))
    return count if isinstance(count, Tensor) else guard_scalar(count)


def reduce(run: Run, state: TokenState, x: Tensor, layer: int, *,
           before_attention: bool = False,
           q: Optional[Tensor] = None, k: Optional[Tensor] = None, bias: Optional[Tensor] = None,
           scale: Optional[float] = None) -> TokenState:
    """The block's reduction step on ``x``.

    Adapters call it twice per block: with ``before_attention=True`` on the block's input, and after
    the attention residual; the reducer acts in the one its ``acts_before_blocks`` names (ATF filters
    a block's input, everything else sits between attention and MLP).
    ``q``/``k`` ``[B, H, N, D]`` are the attention's query and key after any norm (needed only when
    ``reduction.needs_qk``); ``bias`` the key bias the attention used, ``scale`` its logit scale. Before
    the attention there are none: the metric is then the hidden states and there is no CLS attention.
    """
    reduction = run.reduction
    if before_attention != reduction.reducer.acts_before_blocks:
        return state.with_x(x)
    kept = num_kept(reduction, state, layer)
    if kept == state.num_scheduled:
        return state.with_x(x)
    metric = k.mean(dim=1) if reduction.metric == "keys" and k is not None else x  # keys: head mean [B, N, D]
    attention = None
    if reduction.wants_cls_attention and q is not None:
        attention = cls_attention(q, k, bias, scale)
    signals = Signals(metric=metric, layer=layer, num_layers=run.num_layers, cls_attention=attention,
                      query=run.query, grid=None if state.is_reduced else run.grid,
                      query_projection=run.query_projection)
    reduced = reduction.reducer(state.with_x(x), kept, signals)
    if reduced.mask is not None and reduced.mask is not state.mask and run.decisions is not None:
        protected = state.num_protected
        run.decisions.append(Decision(layer, reduced.mask[:, protected:],
                                      (kept - protected) / max(state.num_original - protected, 1)))
    return reduced


def dropping_as_published(reduction: Reduction) -> Reduction:
    """The reduction with a dropping method's ``fuse`` set to the paper's rule where the user gave none:
    ``"drop"`` (FastV, HiRED, ATF, Script), ``"one"`` for EViT.

    For visual tokens headed into a language model. Merging the unkept tokens into the kept ones
    (``fuse="nearest"``, the reducers' default) was measured on vision encoders only; inside or before
    a language model nothing has measured it, so the published rule holds there.
    """
    reducer = reduction.reducer
    if reducer.published_fuse is None or "fuse" in reduction.arguments:
        return reduction
    published = copy.copy(reducer)
    published.fuse = reducer.published_fuse
    return dataclasses.replace(reduction, reducer=published)


def batch_query(query: Optional[Tensor], batch: int, width: Optional[int], where: str) -> Optional[Tensor]:
    """The query set by ``vtr.conditioned`` for this batch: a batch-1 query is shared by every image.

    ``width`` is the embedding width the adapter maps tokens to (the CLIP embedding); a query of
    another width is an error here, before any work is done.
    """
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


def condition(run: Run, batch: int, width: Optional[int], where: str,
              projection: Optional[Callable[[Tensor], Tensor]] = None) -> None:
    """Check this call's query (``vtr.conditioned``) with :func:`batch_query` and keep it on the run, with
    ``projection`` (a token's map into the query's embedding space) for the blocks' reduction steps.

    Kept on the run, not the model: it is per call, and activation checkpointing recomputes a block
    with the run it ran under.
    """
    run.query = batch_query(run.query, batch, width, where)
    run.query_projection = projection if run.query is not None else None


def grid_of(rows_cols: Optional[tuple], num_prefix: int, num_tokens: int) -> Optional[tuple]:
    """The patch grid ``(rows, cols)`` of this call if it accounts for every token after the prefix, else None.

    ``rows_cols`` must be read from this call's patch embedding (:func:`conv_grid`, or the embedding's
    own output shape), never the model's default grid: 14 x 10 and 10 x 14 patches are the same number
    of tokens, so a token count can confirm a grid but never tell which one it is. A count that does
    not match (patches dropped before the blocks) means the tokens are no grid at all.
    """
    if rows_cols is None:
        return None
    rows, cols = rows_cols
    return (int(rows), int(cols)) if rows * cols + num_prefix == num_tokens else None


def conv_grid(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """``(rows, cols)`` a patch-embedding convolution gives on a ``height x width`` image (its output size)."""
    def out(size: int, i: int) -> int:
        if conv.padding == "same":   # stride 1 only: the size is kept
            return size
        padding = 0 if conv.padding == "valid" else conv.padding[i]
        return (size + 2 * padding - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1

    return out(int(height), 0), out(int(width), 1)


def run_blocks(blocks: nn.Module, run: Run, checkpointing: bool) -> TokenState:
    """Call each block as a module (so hooks on blocks fire) on the run's tokens; return the final state.

    A reducing block reads its token state from the active run and leaves the state after its step
    there. The next block gets what the call returned, not the tokens the block left in the run: as on
    any module, a forward hook that returns a value replaces the block's output (and a forward pre-hook
    that returns one replaces its input, which the block reads from its argument). A hook may change
    the tokens' values, not their count: the sizes are the block's. Under activation checkpointing a
    block is recomputed after the call, so its input state travels with it as an argument and the run
    is made active again for the recomputation.
    """
    for i, block in enumerate(blocks):
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(_recomputable, block, run.state.x, run.state, run,
                                                  use_reentrant=False)
        else:
            x = block(run.state.x)
        if tuple(x.shape[:2]) != tuple(run.state.size.shape):
            raise RuntimeError(f"block {i} of a vtr-patched model returned {tuple(x.shape[:2])} tokens but left "
                               f"{tuple(run.state.size.shape)} in the model's token state: a forward hook on a block "
                               "may change its output's values, not its number of tokens")
        run.state = run.state.with_x(x)
    return run.state


def _recomputable(block: nn.Module, x: Tensor, state: TokenState, run: Run) -> Tensor:
    with bound(run):
        run.state = state.with_x(x)
        output = block(x)
    return output


def entering(run: Optional[Run], x: Tensor) -> Optional[TokenState]:
    """The token state a block's input ``x`` belongs to, or None when the block runs outside a
    patched forward pass (called on its own: it then computes exactly what the unpatched block does)."""
    if run is None or run.state is None:
        return None
    if run.state.num_tokens != x.shape[1] or run.state.x.shape[0] != x.shape[0]:
        raise RuntimeError(f"a vtr-patched block got {tuple(x.shape[:2])} tokens but the model's token state "
                           f"holds {tuple(run.state.x.shape[:2])}; blocks run in order on the model's own tokens")
    return run.state.with_x(x)


def key_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """``log(size)`` as a ``[B, N]`` additive key bias for pooling attention (size 0 -> -inf)."""
    return size.log().to(dtype)


def linear_macs(module: torch.nn.Module) -> float:
    """MACs per token of every ``nn.Linear`` inside ``module``."""
    return float(sum(m.in_features * m.out_features for m in module.modules()
                     if isinstance(m, torch.nn.Linear)))
