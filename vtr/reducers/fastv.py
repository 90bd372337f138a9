"""Attention-ranked dropping without fusion (FastV: Chen et al., "An Image is Worth 1/2 Tokens After
Layer 2"): keep the tokens the query token attends to most, drop the rest.

The query token is whatever the adapter's ``cls_attention`` signal comes from: the CLS token in a
ViT, the last prompt token inside a language model (vtr's LLaVA adapter with ``layers=[K]``).
Without a CLS token it falls back to the same metric-norm score as ``evit``. ``fuse`` says what
happens to the tokens not kept (default ``"nearest"``: each merges into its most similar kept token;
``"drop"`` is FastV as published).
"""
from __future__ import annotations

from typing import Optional

from ..core.state import TokenState
from .base import Signals, register
from .drop import AttentionScored, once_after_mixing
from .select import attention_scores, fused_dest, num_chosen, real_tokens, top_scores


@register
class FastV(AttentionScored):
    name = "fastv"
    description = "keep the tokens the query (CLS / last prompt) token attends to most, fuse or drop the rest (FastV)"
    paper = "Chen et al. 2024, arXiv 2403.06764"
    stages = ("tower", "before_lm", "in_lm")
    needs = frozenset({"cls_attention", "attention_received"})

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return once_after_mixing(num_layers)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        score = attention_scores(self, state, signals)
        kept = top_scores(score, real_tokens(state), num_chosen(state, num_kept, self.fuse))
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)
