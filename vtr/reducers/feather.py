"""In-LM dropping by attention without the rotary embedding, plus a uniform grid (FEATHER: Endo et al., "Feather
the Throttle: Revisiting Visual Token Pruning for Vision-Language Model Acceleration", ICCV 2025, arXiv 2412.13180;
code github.com/markendo/FEATHER, ``prismatic/models/backbones/llm/llama2_models.py``).

FastV ranks the image's tokens by the last prompt token's attention. The paper finds that at early layers the
rotary embedding makes that attention favour the tokens nearest the prompt, the bottom of the image, and that the
kept set then misses whole regions. FEATHER changes two things: the attention is computed *without* the rotary
embedding, a softmax over the image's tokens only (head mean); and at the first stage a uniform grid of the image
(every ``stride``-th row and column from the top left, ``grid[::s, ::s]``) is kept besides the best-attended
tokens. Later stages rank by the same attention only. The official scripts prune at layers 8 and 16 of 32
(``--fastv_k "[8, 16]"``), keep 30% by attention at the first (``--fastv_ratio 0.7``) and use ``s=3``.

How vtr fits the rule to a budget: the first stage keeps the grid, then the best-attended other tokens up to its
count (the official code keeps the top 30% and the grid, whatever their union's size; the same set when the count
is that union's). The grid takes at most half of a stage's kept tokens, rounded up: where ``grid[::s, ::s]`` has
more (budgets below the paper's, e.g. 7 of an 8 x 8 grid), the stride grows until it fits. Stage counts: each
stage before the last keeps ``max(budget, floor(N * ratio ** i))``, the last ``budget`` (the official second stage
keeps ``ratio ** 2`` of the first stage's count; vtr's budget sets the last count instead). The official code ranks
with the attention of the layer before a stage (its q/k on that layer's input) and prunes that layer's output; vtr
ranks with the stage layer's own q/k on the states entering it, and prunes them there (its convention for every
in-LM method), so ``layers=[K]`` here prunes where the official ``fastv_k=[K]`` does (on the VLM yardstick vtr's
ranking keeps more answers: ``benchmarks/vlm_probes.py convention``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Signals, check_number, register
from .pyramiddrop import PyramidDrop
from .select import attention_scores, fused_dest, num_chosen, real_tokens, top_scores


def grid_stride(rows: int, cols: int, stride: int, count: int) -> int:
    """The smallest stride from ``stride`` whose grid ``[::s, ::s]`` of a ``rows x cols`` image has at most
    ``ceil(count / 2)`` tokens (at least one: the top-left token)."""
    most = max(1, math.ceil(count / 2))
    while math.ceil(rows / stride) * math.ceil(cols / stride) > most:
        stride += 1
    return stride


def uniform_grid(rows: int, cols: int, stride: int) -> Tensor:
    """Raster indices of ``grid[::stride, ::stride]`` of a ``rows x cols`` image (FEATHER's uniform sample)."""
    return torch.arange(rows * cols).view(rows, cols)[::stride, ::stride].flatten()


def feather_layers(num_layers: int) -> list[int]:
    """FEATHER's stage layers scaled to the depth: 8 and 16 of 32 (a quarter and half), never layer 0."""
    return sorted({min(max(1, num_layers * k // 4), num_layers - 1) for k in (1, 2)}) if num_layers > 1 else [0]


@register
class Feather(PyramidDrop):
    """The image's tokens ranked by the last prompt token's attention without the rotary embedding, a uniform
    ``grid[::stride, ::stride]`` kept besides them at the first stage; the rest dropped (``fuse="drop"`` as
    published; ``"nearest"`` or ``"one"`` fuse them instead). Staged as PyramidDrop: each stage before the last
    keeps ``floor(N * ratio ** i)`` (:meth:`PyramidDrop.stage_counts`), at FEATHER's own layers and ratio."""

    name = "feather"
    description = "in-LM dropping by the last prompt token's attention without RoPE, plus a uniform grid (FEATHER)"
    paper = "Endo et al. 2025, arXiv 2412.13180"
    stages = ("in_lm",)
    needs = frozenset({"cls_attention", "unrotated_attention"})

    def __init__(self, stride: int = 3, ratio: float = 0.3, fuse: str = "drop"):
        super().__init__(ratio, fuse)
        self.stride = int(check_number(self, "stride", stride, "an int >= 1 (every stride-th row and column of the "
                                       "image kept at the first stage)", lambda s: s >= 1, integer=True))

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return feather_layers(num_layers)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        score = attention_scores(self, state, signals).float()
        chosen = num_chosen(state, num_kept, self.fuse)
        if signals.grid is not None and chosen > 0 and math.prod(signals.grid) == score.shape[1]:
            # the first stage, the image's tokens still in raster order: the grid first, then the best attended
            rows, cols = signals.grid
            grid = uniform_grid(rows, cols, grid_stride(rows, cols, self.stride, chosen)).to(score.device)
            score = score.clone()
            score[:, grid] = float("inf")
        kept = top_scores(score, real_tokens(state), chosen)
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)
