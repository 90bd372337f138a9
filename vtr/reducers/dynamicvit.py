"""Learned keep scores (DynamicViT, Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic
Token Sparsification").

At each reducing block a light prediction module scores every token from its own features and a
summary of the image's tokens.

- **Training mode:** every token gets a hard keep decision (0 or 1 in the forward pass) with a
  straight-through gradient (the backward pass sees the sigmoid of its score). Decisions multiply into
  the token state's ``mask``: the batch keeps its shape and every row makes its own choice, and later
  blocks attend only to kept tokens (:meth:`~vtr.core.state.TokenState.attention_bias` turns the mask
  into a key bias). By default (``threshold="budget"``) a token is kept when its score beats its row's
  cutoff for the scheduled count (midway between that count's last score and the next, no gradient):
  training keeps what eval will keep. ``noise=1`` adds the paper's Gumbel noise (its two-class
  Gumbel-softmax is a sigmoid of the logit plus logistic noise) for exploration; ``threshold="zero"``
  is the paper's rule (keep when the logit beats 0), for which the keep-ratio loss
  (``vtr.losses.keep_ratio``) pulls each row's kept fraction to the schedule's. No noise is the
  default because it is what trained here: reducer-only on the fidelity task at 35% FLOPs, top-1 went
  from 50.0% to 73.8% in 300 steps without noise, and stayed at 52% (200 steps, noise 0.3) and 50.2%
  (375 steps, noise 1)
  (``benchmarks/RESULTS-finetune.md``).
- **Eval mode:** the exact scheduled count, by top score; the other tokens are dropped, as in the
  paper. ``flops=`` / ``keep=`` / ``r=`` are solved by the same cost model as every method, with the
  prediction modules' own MACs counted.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.signals import Need
from ..core.state import TokenState
from .base import Reducer, Signals, check_number, dest_from_choice, register
from .drop import EvitLayers
from .learned import INITS, before_last_block, check_width, learnable_stages, stage_module
from .select import attention_scores, real_tokens, top_scores

THRESHOLDS = ("budget", "zero")


def _widths(width: int) -> tuple[int, int]:
    """Hidden widths of the scoring MLP: half and a quarter of the token width."""
    return max(width // 2, 1), max(width // 4, 1)


class KeepPredictor(nn.Module):
    """Keep logit per token from its own features and a weighted mean of the image's (DynamicViT's
    prediction module: half the channels stay local, the other half are summarised over the tokens
    that are still kept).

    ``prior``: the logit adds ``prior_scale * log(CLS attention)`` and the MLP's last layer starts at
    zero, so before any training the module keeps exactly the tokens EViT keeps. (A zero output layer
    passes no gradient to the layers before it: the first step trains it and the scale, later steps all.)
    """

    def __init__(self, width: int, prior: bool):
        super().__init__()
        half, quarter = _widths(width)
        self.local = width // 2
        self.embed = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.score = nn.Sequential(nn.Linear(width, half), nn.GELU(), nn.Linear(half, quarter), nn.GELU(),
                                   nn.Linear(quarter, 1))
        self.prior_scale = nn.Parameter(torch.ones(1)) if prior else None   # 1-D: FSDP2 shards no scalars
        if prior:
            nn.init.zeros_(self.score[-1].weight)
            nn.init.zeros_(self.score[-1].bias)

    @staticmethod
    def macs(width: int) -> float:
        """MACs per token (the linear layers; the summary is an elementwise weighted mean)."""
        half, quarter = _widths(width)
        return float(width * width + width * half + half * quarter + quarter)

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x`` ``[B, U, C]``, ``weight`` ``[B, U]`` (size times keep decision) -> logits ``[B, U]``."""
        hidden = self.embed(x)
        local, summary = hidden[..., :self.local], hidden[..., self.local:]
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        summary = (summary * weight[..., None].to(summary.dtype)).sum(dim=1, keepdim=True).expand_as(summary)
        return self.score(torch.cat([local, summary], dim=-1)).squeeze(-1)


@register
class DynamicViT(EvitLayers, Reducer):
    """Learned keep scores; see the module docstring.

    ``init``: ``"cls_attention"`` (default) adds the CLS attention row to the learned score (a learned
    scale, 1 at first) and starts the MLP at zero, so the untrained module keeps EViT's tokens (those
    of ``evit`` with ``fuse="drop"``); ``"random"`` is the paper's module alone, randomly initialised.
    ``temperature`` of the straight-through sigmoid in training (1, as the paper). ``threshold``: what a
    training decision's score must beat, ``"budget"`` (its row's cutoff for the scheduled count) or
    ``"zero"``. ``noise``: the scale of the Gumbel (logistic) noise added in training, 0 (default: each row
    keeps its exact top-k, as in eval) or 1 (the paper's Gumbel-softmax sampling).
    By default it reduces at EViT's (and DynamicViT's) layers: a quarter, half and three quarters in,
    never at the last block (where a decision reaches nothing that learns from it).
    """

    name = "dynamicvit"
    description = "learned keep scores: a prediction module per stage keeps the top tokens (DynamicViT; trainable)"
    paper = "Rao et al. 2021, arXiv 2106.02034"
    stages = ("tower",)
    needs = frozenset({"cls_attention"})   # per instance: only with init="cls_attention"
    max_step = 1.0
    learned = True

    def __init__(self, init: str = "cls_attention", temperature: float = 1.0, threshold: str = "budget",
                 noise: float = 0.0):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"dynamicvit: init must be one of {INITS} (random weights, or starting from the CLS "
                             f"attention score so it keeps EViT's tokens), got {init!r}")
        if threshold not in THRESHOLDS:
            raise ValueError(f"dynamicvit: threshold must be one of {THRESHOLDS} (a row's cutoff for the scheduled "
                             f"count, or 0 as in the paper), got {threshold!r}")
        self.threshold = threshold
        temperature = check_number(self, "temperature", temperature, "a finite number > 0", lambda t: t > 0)
        noise = check_number(self, "noise", noise, "a finite number >= 0 (the scale of the Gumbel noise in training)",
                             lambda n: n >= 0)
        self.init, self.temperature, self.noise = init, float(temperature), float(noise)
        self.needs = frozenset({Need.CLS_ATTENTION}) if init == "cls_attention" else frozenset()
        self.predictors = nn.ModuleDict()

    def build(self, width: int, counts: Sequence[int], num_protected: int) -> None:
        width = check_width(self, width)
        self.predictors = nn.ModuleDict({str(layer): KeepPredictor(width, self.init == "cls_attention")
                                         for layer, _, _ in learnable_stages(self, counts)})

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return before_last_block(super().default_layers(num_layers), num_layers)

    def deeper_target_layers(self, num_layers: int) -> Optional[list[int]]:
        return before_last_block(super().deeper_target_layers(num_layers), num_layers)

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        scoring = float(num_tokens * cost.attn_dim) if Need.CLS_ATTENTION in self.needs and cost.has_cls else 0.0
        return (num_tokens - cost.num_protected) * KeepPredictor.macs(cost.width) + scoring

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        predictor = stage_module(self, self.predictors, signals.layer)
        protected = state.num_protected
        logit = predictor(state.x[:, protected:], state.weight()[:, protected:])
        prior = attention_scores(self, state, signals) if predictor.prior_scale is not None else None
        if self.training:
            score = logit.float()
            if prior is not None:
                score = score + predictor.prior_scale * prior.clamp_min(torch.finfo(torch.float32).tiny).log()
            return self._sample(state, num_kept, score)
        # Eval: in float64, where log is injective on float32 scores, so the untrained module's order is
        # exactly the CLS attention's (ties included) and it keeps EViT's tokens.
        score = logit.double()
        if prior is not None:
            score = score + predictor.prior_scale.double() * prior.double().clamp_min(1e-300).log()
        kept = top_scores(score, real_tokens(state), num_kept - protected)
        return state.reduce(dest_from_choice(state, kept), num_kept)

    def _sample(self, state: TokenState, num_kept: int, score: Tensor) -> TokenState:
        """Hard decisions (with Gumbel noise if ``noise``) and a straight-through gradient, folded into the mask.
        A score tied with its row's cutoff is not kept (learned float scores rarely tie)."""
        protected = state.num_protected
        keep = real_tokens(state).to(score.dtype)
        if state.mask is not None:
            keep = keep * state.mask[:, protected:]
        if self.threshold == "budget":
            score = score - budget_cutoff(score.detach(), keep > 0.5, num_kept - protected)
        noisy = score
        if self.noise:
            uniform = torch.rand_like(score).clamp(1e-6, 1 - 1e-6)
            noisy = score + self.noise * (uniform.log() - (-uniform).log1p())   # + logistic noise
        noisy = noisy / self.temperature
        soft = noisy.sigmoid()
        keep = keep * ((noisy > 0).to(soft.dtype) + (soft - soft.detach()))   # exactly 0 or 1 forward
        mask = torch.cat([keep.new_ones(keep.shape[0], protected), keep], dim=1)
        return state.masked(mask, num_kept)


def budget_cutoff(score: Tensor, alive: Tensor, count: int) -> Tensor:
    """``[B, 1]`` per row: midway between the ``count``-th and the next highest score of the ``alive`` tokens,
    so exactly the top ``count`` beat it; ``-inf`` (keep every one) when no more than ``count`` are alive."""
    ranked = score.masked_fill(~alive, float("-inf")).sort(dim=1, descending=True).values
    if count >= ranked.shape[1]:
        return score.new_full((score.shape[0], 1), float("-inf"))
    last, next_ = ranked[:, count - 1:count], ranked[:, count:count + 1]
    return torch.where(torch.isfinite(next_), (last + next_) / 2, float("-inf"))
