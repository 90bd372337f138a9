"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
arXiv 2412.04467): dominant tokens by the vision tower's [CLS] attention, plus a few contextual tokens that
absorb the rest by key similarity."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals, check_number, dest_from_choice, register
from .fastervlm import last_layer
from .select import (check_decision_inputs, check_signal, keep_first, real_tokens, top_scores, tower_importance,
                     unit_rows)

MERGES = ("add", "mean")


def split_budget(num_kept: int, contextual: float) -> tuple[int, int]:
    """(dominant, contextual) tokens of ``num_kept``: ``round(num_kept * contextual)`` contextual, half up (the
    paper's 54 + 10 of 64, 108 + 20 of 128 and 162 + 30 of 192 are all ``contextual = 10 / 64``)."""
    count = int(num_kept * contextual + 0.5)
    return num_kept - count, count


def contextual_targets(remaining: Tensor, num_contextual: int) -> Tensor:
    """``[B, U]`` True for the target tokens among the ``remaining`` ones (``[B, U]`` bool): VisionZip's uniformly
    spaced ``arange(0, R, max(1, R // C))[:C]`` over the R remaining tokens of each row, in position order."""
    if num_contextual == 0:
        return torch.zeros_like(remaining)
    rank = remaining.long().cumsum(dim=1) - 1                                 # place among the remaining
    step = (remaining.sum(dim=1, keepdim=True) // num_contextual).clamp_min(1)
    return remaining & (rank % step == 0) & (rank // step < num_contextual)


@register
class VisionZip(Reducer):
    """Keep ``D`` dominant tokens, the highest [CLS] attention (head mean) at the feature layer, and ``C``
    contextual ones: the other tokens, in position order, are split into ``C`` uniformly spaced targets and the
    rest, and each of the rest merges into the target whose metric (attention keys, head mean, as VisionZip) is
    most similar by cosine. ``C = round(num_kept * contextual)``, ``D = num_kept - C``.

    Defaults from the paper and its code (github.com/dvlab-research/VisionZip): ``contextual=10/64`` (54 + 10
    of 64 tokens, 108 + 20 of 128, 162 + 30 of 192; the code keeps LLaVA's [CLS] feature among the dominant
    ones, vtr's LLaVA gives the language model no [CLS] feature, so all 54 are patches), the keys of the feature
    layer (head mean) as the similarity: ``signals.keys`` where a family gives them (LLaVA, LLaVA-NeXT), else the
    metric, ``metric="keys"`` by default on a ViT tower (on Qwen-VL and LLaVA-NeXT-Video, which give no keys, the
    features the language model reads); on a bare ViT tower its last block.
    ``merge="add"`` is the code's contextual token, the target's feature plus the mean of the tokens merged into
    it (size-weighted, all sizes are 1 there); ``merge="mean"`` is vtr's size-weighted mean of all of them.
    Sizes always add up. Tokens come out in position order (the code puts the dominant ones first). Without a
    [CLS] token (Qwen-VL; the SigLIP towers of LLaVA-OneVision, Gemma 3, SmolVLM) dominance is the attention each
    token receives at the tower's feature layer, mean over queries and heads (VisPruner's rule for SigLIP towers);
    InternVL gives InternViT's real [CLS] row; a model that offers neither is an error
    (:func:`~vtr.reducers.select.tower_importance`).
    """

    name = "visionzip"
    description = "dominant tokens by [CLS] attention plus contextual tokens that absorb the rest (VisionZip)"
    paper = "VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467)"
    stages = ("tower", "before_lm")
    needs = frozenset({"cls_attention", "attention_received", "keys", "metric"})
    requires_one_of = frozenset({"cls_attention", "attention_received"})   # select.tower_importance
    max_step = 1.0

    def __init__(self, contextual: float = 10 / 64, merge: str = "add"):
        super().__init__()
        self.contextual = float(check_number(self, "contextual", contextual,
                                             "the fraction of kept tokens that are contextual, in [0, 1]",
                                             lambda fraction: 0 <= fraction <= 1))
        if merge not in MERGES:
            raise ValueError(f"visionzip: merge must be one of {MERGES} (the target plus the mean of what merges "
                             f"into it, as VisionZip's code, or the size-weighted mean of all), got {merge!r}")
        self.merge = merge

    def patch_defaults(self) -> dict:
        return {"metric": "keys"}   # VisionZip matches contextual tokens by the feature layer's keys

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return last_layer(num_layers)

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        """The [CLS] row (with a [CLS] token) and the cosine of every unprotected token with every target."""
        kept = (num_tokens + cost.num_protected) // 2 if num_kept is None else num_kept
        dominant, contextual = split_budget(kept - cost.num_protected, self.contextual)
        unprotected = num_tokens - cost.num_protected
        scoring = float(num_tokens * cost.attn_dim) if cost.has_cls else 0.0
        return scoring + float(unprotected * contextual * cost.metric_dim)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        # The tower's keys where the family gives them apart from the metric (before a language model), else the
        # metric (on a ViT tower metric="keys", this method's default).
        name, similar = ("keys", signals.keys) if signals.keys is not None else ("metric", signals.metric)
        if similar is None:
            raise ValueError("visionzip needs signals.keys or signals.metric (what contextual tokens are matched by)")
        metric = check_signal(self, name, similar, state)
        check_decision_inputs(self, state, cls_attention=signals.cls_attention,
                              attention_received=signals.attention_received, **{name: metric})
        protected = state.num_protected
        num_dominant, num_contextual = split_budget(num_kept - protected, self.contextual)
        score, valid = tower_importance(self, state, signals), real_tokens(state)
        dominant = torch.zeros_like(valid).scatter_(1, top_scores(score, valid, num_dominant), True) & valid
        remaining = valid & ~dominant
        target = contextual_targets(remaining, num_contextual)
        merged = remaining & ~target if num_contextual else torch.zeros_like(remaining)
        # Padding only fills places no real token can (a row with fewer real tokens than the budget).
        kept = keep_first((dominant | target).float() * 2 + (~valid).float(), num_kept - protected)
        dest = dest_from_choice(state, kept)

        # Each token's most similar target (first in position order on a tie, as argmax over the code's targets).
        into = torch.zeros_like(valid, dtype=torch.long)                    # [B, U]; read for merged tokens only
        if num_contextual:
            tokens = unit_rows(metric[:, protected:])
            targets = keep_first(target.float(), num_contextual)           # [B, C]; fillers where a row has fewer
            chosen = tokens.gather(1, targets[..., None].expand(-1, -1, tokens.shape[-1]))
            similarity = (tokens @ chosen.transpose(1, 2)).masked_fill(~target.gather(1, targets)[:, None, :],
                                                                      float("-inf"))
            into = targets.gather(1, similarity.argmax(dim=-1))
        rel = dest[:, protected:]
        dest = torch.cat([dest[:, :protected], torch.where(merged, rel.gather(1, into), rel)], dim=1)
        if self.merge == "mean":
            return state.reduce(dest, num_kept)
        return self._target_plus_mean(state, dest, num_kept, target)

    @staticmethod
    def _target_plus_mean(state: TokenState, dest: Tensor, num_kept: int, target: Tensor) -> TokenState:
        """VisionZip's contextual token: ``x_target + mean(x merged into it)`` (the mean is 0 if nothing merged)."""
        is_target = torch.cat([target.new_zeros(target.shape[0], state.num_protected), target], dim=1)
        reduced = state.reduce(dest, num_kept, weight=state.size.masked_fill(is_target, 0.0))
        own = state.x * is_target[..., None].to(state.x.dtype)
        added = torch.zeros_like(reduced.x).scatter_add_(1, dest.clamp_min(0)[..., None].expand_as(own), own)
        return reduced.with_x(reduced.x + added)
