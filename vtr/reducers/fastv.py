"""Attention-ranked dropping without fusion (FastV: Chen et al., "An Image is Worth 1/2 Tokens After
Layer 2"): keep the tokens the query token attends to most, drop the rest.

The query token is whatever the adapter's ``cls_attention`` signal comes from: the CLS token in a
ViT, the last prompt token inside a language model (vtr's LLaVA adapter with ``layers=[K]``).
"""
from __future__ import annotations

from ..state import TokenState
from .base import Reducer, Signals, check_budget, dest_from_choice, register


@register
class FastV(Reducer):
    name = "fastv"
    description = "keep the tokens the query (CLS / last prompt) token attends to most, drop the rest (FastV)"
    needs = frozenset({"cls_attention"})

    def forward(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        check_budget(self, state, num_kept)
        if num_kept == state.num_tokens:
            return state
        attention = signals.cls_attention
        if attention is None or attention.shape != state.size.shape:
            shape = None if attention is None else tuple(attention.shape)
            raise ValueError(f"fastv needs signals.cls_attention [B, N] = {tuple(state.size.shape)}, got {shape}")
        score = attention[:, state.num_protected:].float().masked_fill(state.size[:, state.num_protected:] == 0, -1.0)
        kept = score.topk(num_kept - state.num_protected, dim=1).indices.sort(dim=1).values
        return state.reduce(dest_from_choice(state, kept), num_kept)
