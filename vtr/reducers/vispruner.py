"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning
in VLMs", ICCV 2025, arXiv 2412.01818): important tokens by the vision tower's [CLS] attention, then diverse
tokens from the rest by removing near-duplicates, a few per pass."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Signals, check_number, register
from .drop import AttentionScored
from .fastervlm import last_layer
from .select import (check_decision_inputs, check_signal, fused_dest, fusion_macs, keep_first,
                     num_chosen, real_tokens, tower_importance, unit_rows)

PER_PASS = 8   # near-duplicates removed per pass at most (VisPruner's code: r = min(8, R - T_div))


def important_count(num_kept: int, important_ratio: float) -> int:
    """Tokens kept for their [CLS] attention: ``int(T * r)``, as VisPruner's code; the other ``T - int(T * r)``
    are the diverse ones."""
    return int(num_kept * important_ratio)


def remove_duplicates(residual: Tensor, tokens: Tensor, num_diverse: int) -> Tensor:
    """VisPruner's pruning of the residual tokens down to ``num_diverse`` ``[G, num_diverse]``.

    ``residual`` ``[G, R]``: token indices in descending [CLS] attention; ``tokens`` ``[G, U, D]`` unit rows.
    Each pass splits the current list alternately into A (even places) and B (odd places), scores each A token
    by its best cosine with B, and removes the ``min(8, R - num_diverse)`` A tokens that score highest (fewer if
    A is shorter); the list becomes the rest of A (best score first) followed by B. Ties: the earlier place.
    The cosines of the residual tokens are computed once (R x R) and each pass reads its A x B block from them.
    """
    if num_diverse <= 0:
        return residual[:, :0]
    width = tokens.shape[-1]
    chosen = tokens.gather(1, residual[..., None].expand(-1, -1, width))
    cosine = chosen @ chosen.transpose(1, 2)                                   # [G, R, R], in residual's order
    place = torch.arange(residual.shape[1], device=residual.device).expand_as(residual)   # rows of ``cosine``
    while True:
        count = place.shape[1]
        remove = min(PER_PASS, count - num_diverse)
        if remove <= 0:
            break
        a, b = place[:, ::2], place[:, 1::2]
        block = cosine.gather(1, a[..., None].expand(-1, -1, cosine.shape[-1])).gather(
            2, b[:, None, :].expand(-1, a.shape[1], -1))                      # [G, |A|, |B|]
        distinct = block.amax(dim=-1).argsort(dim=1, descending=True, stable=True)[:, remove:]
        place = torch.cat([a.gather(1, distinct), b], dim=1)
    return residual.gather(1, place)


def pass_macs(num_residual: int, num_diverse: int, width: int) -> float:
    """Multiply-accumulates of :func:`remove_duplicates`: the cosines of the residual tokens, once."""
    return float(num_residual * num_residual * width) if num_diverse > 0 and num_residual > num_diverse else 0.0


@register
class VisPruner(AttentionScored):
    """Keep ``int(T * important_ratio)`` important tokens, the highest [CLS] attention (head mean) of the feature
    layer, and fill the other ``T - int(T * important_ratio)`` places with diverse tokens: the remaining tokens,
    in descending attention, lose their near-duplicates by repeated bipartite matching on the cosine of their
    features (``signals.metric``), at most 8 per pass, until that many are left (:func:`remove_duplicates`). The
    others are dropped.

    Defaults from the official code (github.com/Theia-4869/VisPruner): ``important_ratio=0.5`` (its
    ``--important_ratio`` default; its scripts also use 0.75), 8 duplicates per pass, the [CLS] row of the
    layer LLaVA reads (on a bare ViT tower: its last block), the unkept tokens dropped (its published rule
    before a language model; on a vision encoder vtr's ``fuse="nearest"`` is the default). Its code compares
    the tower's own features, before the projector; vtr's vision-language families compare the features the
    language model reads (the projector's output). Without a [CLS] token the importance is the attention each
    token receives in the tower's last layer, averaged over queries and heads: the code's rule for SigLIP
    towers (``attentions[-1].mean(dim=-2)``, then the head mean), given by vtr's Qwen-VL, LLaVA-OneVision, Gemma 3
    and SmolVLM families at the layer the features come from (the last one in their released configurations);
    InternVL gives InternViT's real [CLS] row; a model that offers neither is an error
    (:func:`~vtr.reducers.select.tower_importance`).
    """

    name = "vispruner"
    description = "important tokens by [CLS] attention plus diverse ones left after removing duplicates (VisPruner)"
    paper = "VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818)"
    stages = ("tower", "before_lm")
    needs = frozenset({"cls_attention", "attention_received", "metric"})
    requires_one_of = frozenset({"cls_attention", "attention_received"})   # select.tower_importance

    def __init__(self, important_ratio: float = 0.5, fuse: str = "nearest"):
        super().__init__(fuse)
        self.important_ratio = float(check_number(self, "important_ratio", important_ratio, "in [0, 1]",
                                                  lambda ratio: 0 <= ratio <= 1))

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return last_layer(num_layers)

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        kept = (num_tokens + cost.num_protected) // 2 if num_kept is None else num_kept
        chosen = kept - cost.num_protected
        important = important_count(chosen, self.important_ratio)
        residual = num_tokens - cost.num_protected - important
        scoring = float(num_tokens * cost.attn_dim) if cost.has_cls else 0.0
        return scoring + fusion_macs(num_tokens, kept, cost, self.fuse) + pass_macs(residual, chosen - important,
                                                                                    cost.metric_dim)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        if signals.metric is None:
            raise ValueError("vispruner needs signals.metric (the token features it removes near-duplicates by)")
        metric = check_signal(self, "metric", signals.metric, state)
        check_decision_inputs(self, state, cls_attention=signals.cls_attention,
                              attention_received=signals.attention_received, metric=metric)
        score, valid = tower_importance(self, state, signals), real_tokens(state)
        kept = self.choose(score, valid, metric[:, state.num_protected:], num_chosen(state, num_kept, self.fuse),
                           padded=state.padded)
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)

    def choose(self, score: Tensor, valid: Tensor, metric: Tensor, k: int, padded: bool = True) -> Tensor:
        """``[B, k]`` kept indices in position order. Rows are grouped by their number of real tokens (the passes
        depend on it), so each row decides exactly as it would alone; padding only fills places no real token
        can (a row with fewer than ``k`` real tokens keeps them all). Without padding (``padded=False``, the
        state's flag) every row is one group, read from the shapes: no host sync, and a weightless copy on the
        meta device profiles."""
        by_attention = score.float().masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)
        chosen = torch.zeros_like(valid)
        tokens = unit_rows(metric)
        if padded:
            real = valid.sum(dim=1)
            groups = [(count, (real == count).nonzero()[:, 0]) for count in real.unique().tolist()]
        else:
            groups = [(valid.shape[1], torch.arange(valid.shape[0], device=valid.device))]
        for count, rows in groups:
            order = by_attention[rows, :count]                    # the row's real tokens, best attention first
            if count <= k:
                picked = order
            else:
                important = important_count(k, self.important_ratio)
                diverse = remove_duplicates(order[:, important:], tokens[rows], k - important)
                picked = torch.cat([order[:, :important], diverse], dim=1)
            chosen[rows] = chosen[rows].scatter(1, picked, True)
        return keep_first(chosen.float() * 2 + valid.float(), k)
