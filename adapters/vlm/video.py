"""A video's budget: merged across neighbouring frames first (``temporal=``), then split across its frames
(``frames=``), each frame reduced to its share by the method on its own.

``vtr.patch(model, method, budget=B, frames="novelty", temporal=0.5)`` on a video-capable model:

1. ``temporal=f`` (optional): ``vtr.reducers.video.TemporalMerge`` merges the tokens that repeat the previous
   frame's at their place until ``round(f * N)`` of the video's N tokens remain (never below one frame's).
2. ``frames=``: the budget ``min(B, tokens left)`` is split across the frames, each at least one token while
   the budget allows: ``"uniform"``, ``"novelty"`` (by how much a frame differs from the previous one) or
   ``"relevance"`` (by its tokens' similarity to the prompt's text, QuoTA-style); see
   ``vtr.reducers.video.frame_weights``. A token merged across frames belongs to its first frame.
3. Each frame's tokens are reduced by the method to the frame's share (with the frame's grid while the
   frame is untouched, so ``pool`` and grid-aware methods work per frame).

What the language model reads is frame after frame, each frame's tokens in raster order of their
representatives (the first original token each carries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from vtr.budget.cost import EncoderCost
from vtr.core.plan import Reduction
from vtr.core.signals import Signals
from vtr.core.state import TokenState
from vtr.budget.visual import frame_budgets
from vtr.reducers.video import TemporalMerge, frame_weights

from .reduce import carried, reduce_state

VIDEO_OPTIONS = ("frames", "temporal")


@dataclass
class ReducedVideo:
    state: TokenState            # [1, K]: the video's tokens, frame after frame
    tokens: list                 # N, after the temporal merge (if any), then kept
    frame_budgets: list          # tokens each frame kept
    reducer_macs: float


def tokens_per_frame(first: Tensor, frames: int, per_frame: int) -> list[int]:
    """Tokens kept from each of ``frames`` frames of ``per_frame`` tokens, from the first original token each kept
    token carries (``[K]``): a token merged across frames counts in its first's frame, a token past the last
    frame (OneVision's newline) in the last."""
    return torch.bincount((first // per_frame).clamp_max(frames - 1), minlength=frames).tolist()


def reduce_video(reduction: Reduction, features: Tensor, grid: tuple, budget: Optional[int],
                 cost: EncoderCost, query: Optional[Tensor] = None, received: Optional[Tensor] = None,
                 attention: Optional[Tensor] = None) -> ReducedVideo:
    """Reduce one video's tokens ``features`` ``[N, D]`` (``grid``: frames, rows, cols) to ``budget``
    (None: the method's own count, for ``pool``); ``cost`` prices the reducers' decisions; ``received`` ``[N]``:
    the attention each token receives in the vision tower, ``attention`` ``[N]`` the CLS attention it carries, where
    the family computes them."""
    frames, rows, cols = grid
    per_frame = rows * cols
    state = TokenState.start(features[None])
    tokens, macs = [state.num_tokens], 0.0
    settings = reduction.visual
    if settings.temporal is not None and frames > 1:
        target = max(per_frame, round(settings.temporal * state.num_tokens))
        if target < state.num_tokens:
            partition = torch.arange(frames, device=features.device).repeat_interleave(per_frame)[None]
            merge = TemporalMerge()
            state = merge(state, target, Signals(metric=state.x, partition=partition))
            tokens.append(target)
            macs += merge.extra_macs(tokens[0], cost)
    frame_of = state.first_carried()[0] // per_frame
    present = torch.bincount(frame_of, minlength=frames)
    if reduction.reducer.fixed_count:
        shares = [None] * frames
    else:
        total = state.num_tokens if budget is None else min(budget, state.num_tokens)
        weights = frame_weights(features.view(frames, per_frame, -1), settings.frames, query)
        shares = frame_budgets(total, present, weights).tolist()
    parts = []
    for frame, share in enumerate(shares):
        members = (frame_of == frame).nonzero()[:, 0]
        part = TokenState(x=state.x[:, members], size=state.size[:, members], num_protected=0,
                          assignment=torch.arange(len(members), device=features.device)[None])
        untouched = len(members) == per_frame and bool((part.size == 1).all())
        if share is None:   # pool: what its factor leaves of the frame's grid
            pooled = reduction.reducer.kept_grid((rows, cols))
            share = pooled[0] * pooled[1] if untouched else len(members)
        if share == 0:      # fewer tokens than frames: this frame keeps none
            part = TokenState(x=part.x[:, :0], size=part.size[:, :0], num_protected=0,
                              assignment=torch.full_like(part.assignment, -1))
        elif share < len(members):
            own = lambda signal: None if signal is None else carried(signal[None], state)[:, members]  # noqa: E731
            part, steps = reduce_state(reduction, part, share, query=query, grid=(rows, cols) if untouched else None,
                                       received=own(received), attention=own(attention))
            macs += sum(reduction.reducer.extra_macs(n, cost, m) for n, m in zip(steps[:-1], steps[1:]))
        parts.append((members, part))
    state = state.joined(parts)
    tokens.append(state.num_tokens)
    return ReducedVideo(state, tokens, [part.num_tokens for _, part in parts], macs)
