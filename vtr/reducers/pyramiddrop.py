"""Staged in-LM dropping (PyramidDrop: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language
Models via Pyramid Visual Redundancy Reduction", arXiv 2410.17247; code github.com/Cooperx521/PyramidDrop).

The language model is cut into stages; at the start of each, the last instruction token's attention to the
visual tokens (head mean, from the layer's own norm, q/k projections and rotary embedding: what vtr's in-LM
pruning computes for ``fastv``) ranks them, and the top ``floor(N * ratio ** i)`` stay after stage i: the
paper's ratio lambda = 0.5 at layers 8, 16 and 24 of LLaVA-1.5's 32 (``--layer_list [8,16,24]``,
``--image_token_ratio_list [0.5,0.25,0.125]`` in the official scripts), i.e. a quarter, half and three
quarters of the depth on any model. The rest is dropped.

``fastv`` with ``fuse="drop"``, ``layers=[8, 16, 24]`` and ``budget=[288, 144, 72]`` decides exactly the same;
this method names it and derives the counts: ``budget=`` is the count after the last stage, each stage before
keeps ``max(budget, floor(N * ratio ** i))``. At ``budget = floor(N * ratio ** m)`` (72 of 576 at the paper's
defaults) that is PyramidDrop as published; another budget changes only the last stage's count.
"""
from __future__ import annotations

import math
from typing import Optional

from .base import check_number, register
from .fastv import FastV


def quarters(num_layers: int) -> list[int]:
    """PyramidDrop's stage layers scaled to the depth: 8, 16, 24 of 32 (never layer 0, never past the last)."""
    return sorted({min(max(1, num_layers * k // 4), num_layers - 1) for k in (1, 2, 3)}) if num_layers > 1 else [0]


@register
class PyramidDrop(FastV):
    """FastV's ranking (last prompt token's attention) at several layers, each stage keeping ``ratio`` of the
    visual tokens the one before had (``floor(N * ratio ** i)``), the last stage exactly ``budget``.
    ``fuse="drop"`` as published; ``"nearest"`` or ``"one"`` fuse the dropped tokens instead."""

    name = "pyramiddrop"
    description = "staged in-LM dropping by the last instruction token's attention, ratio 0.5 per stage (PyramidDrop)"
    paper = "Xing et al. 2024, arXiv 2410.17247"
    stages = ("in_lm",)

    def __init__(self, ratio: float = 0.5, fuse: str = "drop"):
        super().__init__(fuse)
        self.ratio = float(check_number(self, "ratio", ratio, "in (0, 1) (the fraction of the visual tokens each "
                                        "stage keeps)", lambda r: 0 < r < 1))

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return quarters(num_layers)

    def stage_counts(self, num_tokens: int, budget: int, num_stages: int) -> Optional[list[int]]:
        # floor, as the official code's int(); the 1e-9 keeps a product that is whole in exact arithmetic but
        # lands just below it in floating point from being floored one short.
        counts = [math.floor(num_tokens * self.ratio ** i + 1e-9) for i in range(1, num_stages)]
        return [max(budget, count) for count in counts] + [budget]
