"""Attention-ranked dropping without fusion (FastV: Chen et al., "An Image is Worth 1/2 Tokens After
Layer 2"): keep the tokens the query token attends to most, drop the rest.

The query token is whatever the adapter's ``cls_attention`` signal comes from: the CLS token in a
ViT, the last prompt token inside a language model (vtr's LLaVA adapter with ``layers=[K]``).
Without a CLS token it falls back to the same metric-norm score as ``evit``.
"""
from __future__ import annotations

from ..core.state import TokenState
from .base import Signals, dest_from_choice, register
from .drop import AttentionScored
from .select import attention_scores, real_tokens, top_scores


@register
class FastV(AttentionScored):
    name = "fastv"
    description = "keep the tokens the query (CLS / last prompt) token attends to most, drop the rest (FastV)"
    needs = frozenset({"cls_attention"})

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        score = attention_scores(self, state, signals)
        kept = top_scores(score, real_tokens(state), num_kept - state.num_protected)
        return state.reduce(dest_from_choice(state, kept), num_kept)
