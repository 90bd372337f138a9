"""Adaptive visual granularity (AVG-LLaVA, Lan et al., arXiv 2410.02745): several pooling levels of an image's
visual tokens and a router that picks one per image and question.

- :func:`pool_level`: the granularity scaler: ``f x f`` average pooling of the token grid (``f = 1`` keeps it).
- :class:`RelevanceRouter` (training-free): how the question's relevance over the finest tokens would be blurred by
  each level. The relevance is a softmax over the tokens ``x`` of ``q . x`` (standardised over the image's tokens,
  then divided by ``temperature``), ``q`` the question's mean embedding (both in the language model's input
  space); a level is fine enough when replacing each window's relevance by its window mean moves at most
  ``tolerance`` of the mass (total variation). The router takes
  the coarsest level that is fine enough: a question spread over the scene gets coarse tokens, one that singles out a
  few tokens gets fine ones.
- :class:`LearnedRouter`: the paper's router: one transformer layer over the finest visual tokens and the
  instruction tokens, an MLP that gives each token a score per level, and a voter (a learned weight per token) that
  sums them into the levels' logits.
- :func:`ranking_loss`: RGLF, the paper's label-free objective: rank the levels by the language model's own answer
  loss at each, and train the router to agree (a pairwise ranking term plus cross-entropy on the best level).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_levels(levels: Sequence[int], grid: Optional[tuple[int, int]] = None) -> tuple[int, ...]:
    """``levels`` as a sorted tuple of at least two distinct integer pooling factors (each at most the ``grid``'s
    side where the grid is known); a clear error otherwise."""
    if isinstance(levels, (int, str)) or not levels:
        raise ValueError(f"granularity: levels must be a list of at least two pooling factors (e.g. [1, 2, 4]), "
                         f"got {levels!r}")
    largest = None if grid is None else min(grid)
    bad = [f for f in levels if not isinstance(f, int) or isinstance(f, bool) or f < 1
           or (largest is not None and f > largest)]
    if bad or len(set(levels)) != len(levels) or len(levels) < 2:
        limit = "" if largest is None else f", at most the token grid's side {largest}"
        raise ValueError(f"granularity: levels must be at least two distinct integer pooling factors >= 1{limit}, "
                         f"got {list(levels)}")
    return tuple(sorted(levels))


def windows(grid: tuple[int, int], factor: int) -> Tensor:
    """``[N]`` the ``factor x factor`` window (row-major over the ``ceil(grid / factor)`` grid) of each token of a
    row-major ``grid``: a grid that ``factor`` does not divide gets smaller windows at its bottom and right edges."""
    rows, cols = grid
    r, c = torch.arange(rows)[:, None] // factor, torch.arange(cols)[None, :] // factor
    return (r * -(-cols // factor) + c).flatten()


def pool_level(tokens: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """``[N, D]`` row-major grid tokens averaged over their :func:`windows`: ``[ceil(rows/f) * ceil(cols/f), D]``."""
    if factor == 1:
        return tokens
    d = tokens.shape[-1]
    image = tokens.view(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    return F.avg_pool2d(image, factor, ceil_mode=True).permute(0, 2, 3, 1).reshape(-1, d)


def relevance(tokens: Tensor, question: Tensor, temperature: float = 1.0) -> Tensor:
    """``[N]`` the question's relevance over the tokens: a softmax of the standardised dot products of the
    question's mean embedding (``[Q, D]``) with each token (``[N, D]``), divided by ``temperature``. Standardised
    (zero mean, unit spread over the image's tokens) because text and visual tokens share the language model's
    input space but not a scale: raw products of a trained LLaVA's small projected features give a near-uniform
    map whatever the question. Computed in float64, so a choice never hinges on rounding; a question equally
    relevant to every token gives the uniform map."""
    scores = tokens.double() @ question.double().mean(0)
    spread = scores.std() if scores.numel() > 1 else scores.new_zeros(())
    if float(spread) <= 1e-12 * max(1.0, float(scores.abs().max())):
        return torch.full_like(scores, 1.0 / scores.numel())
    return ((scores - scores.mean()) / spread / temperature).softmax(-1)


def blur(p: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """Total variation between ``p`` (``[N]`` on ``grid``; or ``[k * N]``: ``k`` grids one after another, e.g. an
    AnyRes image's thumbnail and crops, each pooled on its own) and ``p`` with each of its :func:`windows` replaced
    by the window's mean: the relevance mass that level ``factor`` cannot place (0 for a level that keeps the
    grid)."""
    if factor == 1:
        return p.new_zeros(())
    n = grid[0] * grid[1]
    if p.numel() % n:
        raise ValueError(f"blur: {p.numel()} values fill no whole number of {grid[0]} x {grid[1]} grids")
    window = windows(grid, factor).to(p.device)
    window = (window + (int(window.max()) + 1) * torch.arange(p.numel() // n, device=p.device)[:, None]).flatten()
    count = torch.bincount(window).to(p.dtype)
    means = torch.zeros_like(count).index_add_(0, window, p) / count
    return 0.5 * (p - means[window]).abs().sum()


class RelevanceRouter:
    """Training-free: the coarsest level whose :func:`blur` of the question's relevance is at most ``tolerance``."""

    def __init__(self, tolerance: float = 0.25, temperature: float = 1.0):
        if not 0.0 <= tolerance <= 1.0:
            raise ValueError(f"granularity: tolerance must be in [0, 1] (the relevance mass a level may blur), "
                             f"got {tolerance!r}")
        if not temperature > 0:
            raise ValueError(f"granularity: temperature must be > 0, got {temperature!r}")
        self.tolerance, self.temperature = float(tolerance), float(temperature)

    def choose(self, tokens: Tensor, question: Tensor, grid: tuple[int, int], levels: Sequence[int]) -> int:
        """Index into ``levels`` (sorted fine to coarse) for one image (``[N, D]``) and its question (``[Q, D]``)."""
        p = relevance(tokens, question, self.temperature)
        fine_enough = [i for i, f in enumerate(levels) if float(blur(p, grid, f)) <= self.tolerance]
        return max(fine_enough)


def _heads(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0)


class LearnedRouter(nn.Module):
    """AVG-LLaVA's router: a transformer layer over ``[visual tokens; instruction tokens]`` (each with a learned
    type embedding), an MLP giving every token a score per level, and a voter: a learned softmax weight per token
    over the sequence, which sums the tokens' scores into one logit per level."""

    def __init__(self, width: int, num_levels: int):
        super().__init__()
        self.kind = nn.Parameter(torch.zeros(2, width))        # visual, instruction
        self.layer = nn.TransformerEncoderLayer(width, _heads(width), dim_feedforward=2 * width, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, num_levels))
        self.voter = nn.Linear(width, 1)

    def forward(self, tokens: Tensor, question: Tensor) -> Tensor:
        """``[K]`` logits over the levels for one image (``[N, D]``) and its instruction (``[Q, D]``)."""
        x = torch.cat([tokens + self.kind[0], question.to(tokens.dtype) + self.kind[1]])[None]
        h = self.layer(x)[0]
        votes = self.voter(h).softmax(0)                       # [N + Q, 1]
        return (votes * self.mlp(h)).sum(0)

    def choose(self, tokens: Tensor, question: Tensor, grid: tuple[int, int], levels: Sequence[int]) -> int:
        return int(self(tokens, question).argmax())


def ranking_loss(logits: Tensor, answer_loss: Tensor, margin: float = 0.05) -> Tensor:
    """RGLF: ``logits`` ``[B, K]`` of the router, ``answer_loss`` ``[B, K]`` the language model's loss on the answer
    at each level. Every pair of levels the LM ranks apart (lower loss first) should get router probabilities in the
    same order by at least ``margin`` (a hinge on the probability gap: without a margin, tied probabilities would
    never part), and the LM's best level the most probability
    (cross-entropy)."""
    p = logits.softmax(-1)
    better = answer_loss[:, :, None] < answer_loss[:, None, :]            # [B, i, j]: level i beats level j
    gap = F.relu(p[:, None, :] - p[:, :, None] + margin)                  # p_j - p_i where i should win
    pairs = (gap * better).sum((1, 2)) / better.sum((1, 2)).clamp_min(1)
    return pairs.mean() + F.cross_entropy(logits, answer_loss.argmin(-1))
