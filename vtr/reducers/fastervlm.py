"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning",
arXiv 2412.01818 v1): keep the visual tokens the vision tower's [CLS] token attends to most, before the
projector, and drop the rest."""
from __future__ import annotations

from typing import Optional

from ..core.state import TokenState
from .base import Signals, register
from .drop import AttentionScored
from .select import check_decision_inputs, fused_dest, num_chosen, real_tokens, top_scores, tower_importance


def last_layer(num_layers: int) -> list[int]:
    """The tower's last block: its [CLS] row is the one a VLM reads its features after (the feature layer)."""
    return [num_layers - 1]


@register
class FasterVLM(AttentionScored):
    """Keep the ``num_kept`` tokens with the highest [CLS] attention (head mean) of the feature layer, drop
    the others: one re-ranking, once, before the projector (FasterVLM's ``encode_images``: the mean over heads
    of the [CLS] row of ``attentions[select_layer]``, then top-k).

    Defaults from the official code (github.com/Theia-4869/FasterVLM): the row of the layer LLaVA reads its
    features from (on a bare ViT tower: its last block, :func:`last_layer`), the unkept tokens dropped
    (``fuse="drop"`` is its published rule, applied before or inside a language model; on a vision encoder
    vtr's ``"nearest"`` is the default, as for every dropping method). The budget is the caller's (the paper
    keeps 144, 58 or 29 of LLaVA-1.5's 576). Unlike ``fastv`` before the language model (the same score) it
    reduces at the tower's last block by default, and it never reads a language model's attention. Without a
    [CLS] token (Qwen-VL; the SigLIP towers of LLaVA-OneVision, Gemma 3, SmolVLM) the score is the attention each
    token receives at the tower's feature layer (the rule of its follow-up VisPruner for SigLIP towers; its own code
    is CLIP-only); InternVL gives InternViT's real [CLS] row; a model that offers neither is an error
    (:func:`~vtr.reducers.select.tower_importance`).
    """

    name = "fastervlm"
    description = "keep the tokens the vision tower's [CLS] token attends to most, drop the rest (FasterVLM)"
    paper = "FasterVLM (Zhang et al., arXiv 2412.01818 v1)"
    stages = ("tower", "before_lm")
    needs = frozenset({"cls_attention", "attention_received"})
    requires_one_of = frozenset({"cls_attention", "attention_received"})   # select.tower_importance

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return last_layer(num_layers)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        check_decision_inputs(self, state, cls_attention=signals.cls_attention,
                              attention_received=signals.attention_received, metric=signals.metric)
        score = tower_importance(self, state, signals)
        kept = top_scores(score, real_tokens(state), num_chosen(state, num_kept, self.fuse))
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)
