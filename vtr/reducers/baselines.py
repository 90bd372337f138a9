"""Baselines every comparison needs: change nothing, or drop a seeded random subset."""
from __future__ import annotations

import torch

from ..core.state import TokenState
from .base import Reducer, Signals, check_number, dest_from_choice, register
from .select import real_tokens


@register
class NoReduction(Reducer):
    """Keeps every token: the patched model computes exactly what the original computes."""

    name = "none"
    description = "no reduction (reference: identical output to the unpatched model)"
    paper = ""
    stages = ("tower", "before_lm", "in_lm")
    max_step = 0.0
    identity = True

    def forward(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        return state  # its max_step is 0: nothing to check, nothing to do


@register
class RandomDrop(Reducer):
    """Drops a random subset of unprotected tokens; padding goes first.

    The choice depends only on (seed, layer), so the same input gives the same output on every
    call, and different rows of a batch get different subsets.
    """

    name = "random"
    description = "drop a seeded random subset of tokens (baseline)"
    paper = ""
    stages = ("tower", "before_lm", "in_lm")

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = check_number(self, "seed", seed, "an integer", integer=True)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        batch, unprotected = state.x.shape[0], state.num_tokens - state.num_protected
        # Modulo 2**64, the range manual_seed takes (a negative seed already wrapped to the same stream),
        # so any integer seed works.
        generator = torch.Generator().manual_seed((self.seed * 10007 + signals.layer) % 2**64)
        score = torch.rand(batch, unprotected, generator=generator).to(state.x.device)
        score = score.masked_fill(~real_tokens(state), -1.0)
        kept = score.topk(num_kept - state.num_protected, dim=1).indices.sort(dim=1).values
        return state.reduce(dest_from_choice(state, kept), num_kept)
