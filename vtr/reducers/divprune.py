"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025, arXiv 2503.02175): keep the most diverse visual tokens, by greedy max-min diversity (MMDP)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals, register
from .fastervlm import last_layer
from .select import (check_decision_inputs, check_fuse, check_signal, fused_dest, fusion_macs, num_chosen, real_tokens,
                     unit_rows)


def max_min_diverse(metric: Tensor, valid: Tensor, k: int) -> Tensor:
    """``[B, k]`` indices (in pick order) of DivPrune's greedy max-min selection over the rows of ``metric``
    ``[B, U, D]``, cosine distance ``1 - cos``; ``valid`` ``[B, U]`` False for padding, which is only picked
    once every real token is (then in position order).

    First pick: the token farthest from its nearest neighbour (DivPrune's code: the second smallest entry of
    its distance column, the smallest being its own 0). Each next pick: the token whose distance to the
    nearest picked token is largest. Ties go to the earlier position (``argmax``), as in the code.
    """
    tokens = unit_rows(metric)
    distance = 1.0 - tokens @ tokens.transpose(1, 2)                       # [B, U, U]
    batch, count = valid.shape
    if k == 0 or count == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=metric.device)
    # The nearest other real token of each token; a token with no other real one is isolated (inf).
    others = valid[:, :, None] & ~torch.eye(count, dtype=torch.bool, device=metric.device)
    nearest = distance.masked_fill(~others, float("inf")).amin(dim=1)       # [B, U]: per column, as the code
    # Padding scores below every real token, and in position order among itself.
    order = torch.arange(count, device=metric.device, dtype=distance.dtype)
    padding_score = -3.0 - order / count
    current = torch.where(valid, nearest, padding_score)
    rows = torch.arange(batch, device=metric.device)
    picked = torch.zeros(batch, count, dtype=torch.bool, device=metric.device)
    picks = []
    for _ in range(k):
        pick = current.masked_fill(picked, float("-inf")).argmax(dim=1)
        picks.append(pick)
        picked[rows, pick] = True
        if len(picks) == 1:   # from now on: the distance to the nearest picked token
            current = torch.where(valid, distance[rows, pick], padding_score)
        else:
            current = torch.where(valid, torch.minimum(current, distance[rows, pick]), padding_score)
    return torch.stack(picks, dim=1)


@register
class DivPrune(Reducer):
    """Keep ``num_kept`` tokens chosen by greedy max-min diversity of their features (``signals.metric``,
    cosine distance): first the token farthest from its nearest neighbour, then, again and again, the token
    farthest from everything kept so far (:func:`max_min_diverse`). The others are dropped.

    How it differs from ``query`` without a query (also a max-min greedy): ``query``'s first pick is the token
    farthest from the image's size-weighted mean token, DivPrune's the token whose nearest neighbour is
    farthest; the picks after it follow the same rule. Defaults from the official code
    (github.com/vbdi/divprune): the features the language model reads (the projector output, layer 0 of the
    LLM), the unkept tokens dropped (its published rule before or inside a language model; on a vision
    encoder vtr's ``fuse="nearest"`` is the default), on a bare ViT tower its last block. The paper's retained
    ratio, 0.098 of the visual tokens (56 of LLaVA-1.5's 576), is an amount: give ``budget=`` or ``keep=``. Its
    code names the LLM layer to prune at (``LAYER_INDEX``, 0 in its runs): with ``layers=`` it prunes inside the
    language model, on that layer's hidden states.
    """

    name = "divprune"
    description = "keep the most diverse tokens by greedy max-min cosine distance (DivPrune)"
    paper = "DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175)"
    stages = ("tower", "before_lm", "in_lm")
    needs = frozenset({"metric"})
    published_fuse = "drop"   # DivPrune drops the tokens it does not keep

    def __init__(self, fuse: str = "nearest"):
        super().__init__()
        self.fuse = check_fuse(self, fuse)

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return last_layer(num_layers)

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        """The pairwise cosine matrix of the unprotected tokens (U^2 d), and the fusion."""
        kept = (num_tokens + cost.num_protected) // 2 if num_kept is None else num_kept
        unprotected = num_tokens - cost.num_protected
        return float(unprotected * unprotected * cost.metric_dim) + fusion_macs(num_tokens, kept, cost, self.fuse)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        if signals.metric is None:
            raise ValueError("divprune needs signals.metric (the token features it measures diversity on)")
        metric = check_signal(self, "metric", signals.metric, state)
        check_decision_inputs(self, state, metric=metric)
        picks = max_min_diverse(metric[:, state.num_protected:], real_tokens(state),
                                num_chosen(state, num_kept, self.fuse))
        kept = picks.sort(dim=1).values
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)


__all__ = ["DivPrune", "max_min_diverse"]
