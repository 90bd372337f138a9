"""Video: merging tokens across neighbouring frames (``temporal``), and splitting a video's token budget across
its frames (uniformly, by novelty, or by relevance to the prompt).

A video's tokens arrive frame by frame, each frame a grid of the same ``n`` tokens in raster order; the
token at one place of the grid in consecutive frames often shows the same thing (a static background).
``temporal`` merges such repeats into one token (after the temporal token merging of video ToMe/PPLLaVA-
style pooling, here with an exact budget); the frame split decides how many tokens each frame keeps
before a spatial method reduces the frame on its own (QuoTA assigns them by the frame's relevance to the
query; novelty gives static stretches few tokens and cuts many).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals, unit
from .select import check_signal

FRAME_SPLITS = ("uniform", "novelty", "relevance")


class TemporalMerge(Reducer):
    """Merge each token into the token at the same place of the previous frame when they are the most alike.

    For every token of frame ``f >= 1`` the cosine similarity (of the metric) with the token at its place in
    frame ``f - 1``; the ``N - num_kept`` most similar merge into that token (ties: earlier token), chains
    across several frames becoming one token (a static patch over the whole clip is one token, of size the
    number of frames), by size-weighted average. Frame 0 never merges away, so at least one frame's tokens
    stay. ``signals.partition`` ``[B, N]`` gives each token's frame (0, 1, ...: equal frames, in order); the
    tokens must be the video's untouched ones (a first step). Without frames (one frame) nothing can merge.

    Not a method of its own (it needs frames, which images do not have): vision-language adapters run it
    before the method on each video, ``vtr.patch(model, method, budget=B, temporal=0.5)``.
    """

    name = "temporal"
    description = "merge tokens with the token at the same place of the previous frame (video; needs frames)"
    needs = frozenset({"metric", "partition"})
    max_step = 1.0

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        return float(num_tokens * cost.metric_dim)   # one cosine per token with its predecessor

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        frames, per_frame = self._frames(state, signals)
        batch, protected = state.x.shape[0], state.num_protected
        if num_kept - protected < per_frame:
            raise ValueError(f"temporal: frame 0 never merges, so it keeps at least one frame's {per_frame} tokens "
                             f"(+{protected} protected); num_kept={num_kept}")
        metric = unit(signals.metric[:, protected:]).view(batch, frames, per_frame, -1)
        similarity = (metric[:, 1:] * metric[:, :-1]).sum(-1).flatten(1)          # [B, (T-1) * n]
        real = (state.size[:, protected:] > 0).view(batch, frames, per_frame)
        similarity = similarity.masked_fill(~(real[:, 1:] & real[:, :-1]).flatten(1), float("-inf"))
        order = similarity.argsort(dim=1, descending=True, stable=True)[:, :state.num_tokens - num_kept]
        merged = torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, order, True)
        merged = torch.cat([merged.new_zeros(batch, per_frame), merged], dim=1).view(batch, frames, per_frame)
        # Each token goes to the first token of its chain of merges; kept tokens keep their order.
        index = torch.arange(frames * per_frame, device=state.x.device).view(1, frames, per_frame).repeat(batch, 1, 1)
        for f in range(1, frames):
            index[:, f] = torch.where(merged[:, f], index[:, f - 1], index[:, f])
        kept = ~merged.flatten(1)
        rank = kept.long().cumsum(1) - 1
        dest = rank.gather(1, index.flatten(1)) + protected
        head = torch.arange(protected, device=state.x.device).expand(batch, protected)
        return state.reduce(torch.cat([head, dest], dim=1), num_kept)

    def _frames(self, state: TokenState, signals: Signals) -> tuple[int, int]:
        """(frames, tokens per frame) from ``signals.partition``, checked."""
        if signals.metric is None or signals.partition is None:
            raise ValueError("temporal needs signals.metric and signals.partition (the frame of each token)")
        if state.is_reduced:
            raise ValueError("temporal merges a video's untouched tokens (frame by frame, in raster order); "
                             "this state was already reduced")
        frame = check_signal(self, "partition", signals.partition, state)[:, state.num_protected:].long()
        frames = int(frame.max()) + 1 if frame.numel() else 1
        per_frame = frame.shape[1] // frames
        expected = torch.arange(frames, device=frame.device).repeat_interleave(per_frame)
        if per_frame * frames != frame.shape[1] or not bool((frame == expected).all()):
            raise ValueError(f"temporal: signals.partition must give frames 0..T-1 of equal size in order, got "
                             f"{frame.shape[1]} tokens in {frames} frames")
        return frames, per_frame


def frame_weights(frames: Tensor, split: str, query: Optional[Tensor] = None) -> Tensor:
    """``[T]`` weight of each frame of one video's tokens ``frames`` ``[T, n, D]`` in its share of the budget.

    uniform: 1 each. novelty: 1 minus the mean cosine similarity of the frame's tokens with the tokens at
        the same places of the previous frame (frame 0: 1, all new): a frame repeating the last one gets
        little. relevance (QuoTA-style, with embeddings in place of QuoTA's questions to the model): the
        mean over the frame's tokens of their best cosine similarity with the query's tokens ``[Q, D]``
        (the prompt's text), clamped at 0.
    """
    if split not in FRAME_SPLITS:
        raise ValueError(f"frames must be one of {FRAME_SPLITS}, got {split!r}")
    count = frames.shape[0]
    if split == "uniform" or count == 0:
        return torch.ones(count, dtype=torch.float64, device=frames.device)
    tokens = unit(frames)
    if split == "novelty":
        alike = (tokens[1:] * tokens[:-1]).sum(-1).mean(-1)
        return torch.cat([alike.new_ones(1), 1.0 - alike]).clamp_min(0.0).double()
    if query is None:
        raise ValueError("frames='relevance' needs a query (the prompt's text, or vtr.conditioned)")
    query = unit(query.reshape(-1, query.shape[-1]).to(frames.dtype))
    return (tokens @ query.T).amax(-1).mean(-1).clamp_min(0.0).double()
