"""Attention-aware token filtering before the encoder (ATF, Naruko et al., "Speed-up of Vision
Transformer Models by Attention-aware Token Filtering").

A static prior (which patch positions the encoder attends to on typical images, estimated once by
:func:`calibrate`) is combined with a dynamic per-image score, and the filter keeps the best
tokens before the first block, so every block runs on the filtered sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals, check_finite, check_number, register, unit
from .select import check_fuse, check_signal, fused_dest, fusion_macs, num_chosen, real_tokens, top_scores


def _standardize(score: Tensor, valid: Tensor) -> Tensor:
    """Zero mean, unit deviation over each row's real tokens, so two scores can be mixed."""
    count = valid.sum(dim=1, keepdim=True).clamp_min(1)
    mean = (score * valid).sum(dim=1, keepdim=True) / count
    spread = (((score - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
    return (score - mean) / spread.sqrt().clamp_min(1e-6)


@register
class ATF(Reducer):
    """Keep tokens by ``prior_weight * static prior + (1 - prior_weight) * dynamic score``, both
    standardized per image.

    ``prior``: ``[P]`` (or ``[rows, cols]``) importance of each patch position at the model's input
    size, from :func:`calibrate`; each current token's prior is the sum over the original positions
    it carries, so later steps work too. Without a prior the filter uses the dynamic score alone.
    The dynamic score is how far a token's features lie from the image's size-weighted mean token
    (1 - cosine): the filter runs before any attention, and tokens that look like the average patch
    (background, flat regions) are the ones it can spare.

    It acts on a block's input (``acts_before_blocks``): ``vtr.patch(model, "atf", keep=0.5,
    layers=[0], prior=prior)`` filters the embedded tokens once, before block 0 (its default layers).
    ``fuse`` says what happens to the tokens not kept (default ``"nearest"``: each merges into its most
    similar kept token; ``"drop"`` is ATF as published).
    """

    name = "atf"
    description = "filter tokens before the encoder by a calibrated attention prior and a per-image score (ATF)"
    paper = "Naruko & Akutsu 2025, arXiv 2506.01519"
    stages = ("tower", "before_lm", "in_lm")
    published_fuse = "drop"   # ATF keeps the filtered tokens and drops the rest
    needs = frozenset({"metric"})
    max_step = 1.0
    acts_before_blocks = True

    def __init__(self, prior: Optional[Tensor] = None, prior_weight: float = 0.5, fuse: str = "nearest"):
        super().__init__()
        self.fuse = check_fuse(self, fuse)
        prior_weight = check_number(self, "prior_weight", prior_weight, "in [0, 1]", lambda w: 0 <= w <= 1)
        if prior is not None:
            try:
                prior = torch.as_tensor(prior, dtype=torch.float32).flatten()
            except (TypeError, ValueError, RuntimeError):   # torch's words name no option
                raise ValueError(f"atf: prior must be numbers, an importance per patch position (a tensor, array or "
                                 f"list, e.g. from vtr.tools.calibrate.calibrate), got {prior!r}") from None
            check_finite(self, "prior", prior, "an importance per patch position")
        self.prior, self.prior_weight = prior, float(prior_weight)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        protected, valid = state.num_protected, real_tokens(state)
        if signals.metric is None:
            raise ValueError("atf needs signals.metric (the tokens' features) for its per-image score")
        metric = unit(check_signal(self, "metric", signals.metric, state)[:, protected:])
        weight = state.size[:, protected:, None]
        mean = unit((metric * weight).sum(dim=1, keepdim=True))
        score = _standardize(1.0 - (metric * mean).sum(dim=-1), valid)
        if self.prior is not None and self.prior_weight > 0:
            prior = _standardize(self._current_prior(state), valid)
            score = self.prior_weight * prior + (1.0 - self.prior_weight) * score
        kept = top_scores(score, valid, num_chosen(state, num_kept, self.fuse))
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        kept = (num_tokens + cost.num_protected) // 2 if num_kept is None else num_kept
        return fusion_macs(num_tokens, kept, cost, self.fuse)

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        """ATF filters once, before the encoder: every block runs on the filtered tokens."""
        return [0]

    def check_input(self, num_tokens: int, num_protected: int) -> None:
        positions = num_tokens - num_protected
        if self.prior is not None and self.prior.numel() != positions:
            raise ValueError(f"atf: prior has {self.prior.numel()} positions but the input has {positions} "
                             "patch tokens; calibrate the prior at this input size")

    def _current_prior(self, state: TokenState) -> Tensor:
        """``[B, U]`` prior of the current tokens: the sum over the original positions each carries."""
        self.check_input(state.num_original, state.num_protected)
        carrier = state.assignment[:, state.num_protected:]
        prior = self.prior.to(state.x.device).expand(carrier.shape[0], -1) * (carrier >= 0)
        current = prior.new_zeros(state.size.shape).scatter_add_(1, carrier.clamp_min(0), prior)
        return current[:, state.num_protected:]
