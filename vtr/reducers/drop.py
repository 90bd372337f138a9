"""Attention-guided dropping: keep the tokens the CLS token attends to (EViT, HiRED).

Both read ``signals.cls_attention``: the adapter computes only the CLS row of the block's attention
from its own q/k (``vtr.core.signals.cls_attention``, O(N d)), so the block keeps its fused kernel.
Models without a CLS token get the fallback score of :func:`~vtr.reducers.select.attention_scores`.

What happens to the tokens a method does not keep is its ``fuse=`` option (:func:`fused_dest`):
dropped, fused into one extra token (EViT), or each merged into its most similar kept token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals, check_number, register
from .select import (attention_scores, check_fuse, check_signal, fused_dest, fusion_macs, keep_first, num_chosen,
                     real_tokens, top_scores)

FUSE_WEIGHTS = ("attention", "size")


def after_mixing(num_layers: int) -> list[int]:
    """EViT's layers, scaled to the depth: a quarter, half and three quarters in (blocks 4, 7 and 10 of
    12, 1-based, as in the paper), never block 0.

    Block 0's CLS query is the same learned vector for every image: its attention row has not looked
    at the image yet, and dropping by it scored below random dropping on a trained ViT here.
    """
    if num_layers == 1:
        return [0]
    return sorted({min(max(1, num_layers * k // 4), num_layers - 1) for k in (1, 2, 3)})


def once_after_mixing(num_layers: int) -> list[int]:
    """One step, early but after the image is mixed: a sixth of the depth (block 2 of 12), never block 0.
    FastV prunes once, after layer 2 of a 32-layer LLM; HiRED drops once, before the LLM."""
    return [min(max(1, num_layers // 6), num_layers - 1)]


class EvitLayers:
    """Where EViT-style methods reduce by default: EViT's layers (:func:`after_mixing`), chosen for keep
    ratios of 0.5 to 0.9 per step; a ``flops=`` target that needs less there adds a step at block 1, the
    first whose CLS attention has seen the image, and one that needs less even then (a shallow model) takes
    the single step at block 1 when that keeps more tokens to the end. Mixed in before :class:`Reducer`."""

    lowest_keep = 0.5

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return after_mixing(num_layers)

    def deeper_target_layers(self, num_layers: int) -> Optional[list[int]]:
        return sorted({min(1, num_layers - 1), *after_mixing(num_layers)})


class AttentionScored(Reducer):
    """Reducers that rank tokens by the CLS attention row (or its no-CLS fallback) and then drop,
    fuse or merge the tokens they do not keep (``fuse``)."""

    published_fuse = "drop"   # FastV, HiRED: the unkept tokens are dropped

    def __init__(self, fuse: str = "nearest"):
        super().__init__()
        self.fuse = check_fuse(self, fuse)

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        # The CLS row q_cls . K^T over every head; without a CLS token, the attention each token receives or a norm.
        scoring = float(num_tokens * cost.attn_dim) if cost.has_cls else 0.0
        kept = (num_tokens + cost.num_protected) // 2 if num_kept is None else num_kept
        return scoring + fusion_macs(num_tokens, kept, cost, self.fuse)



@register
class EViT(EvitLayers, AttentionScored):
    """Keep the top tokens by CLS attention; fuse all the others into one extra token (EViT,
    Liang et al., "Not All Patches are What You Need").

    ``fuse="one"`` (as EViT; the default is ``"nearest"``, measured better here): the fused token is the last of the ``num_kept`` tokens (it
    counts inside the budget); its size is the sum of the fused sizes, so total size is conserved.
    Its feature is a weighted mean of the fused features. ``fuse_weight="attention"`` (default, as
    EViT) weights each by attention x size, which conserves the attention-weighted feature mass
    ``sum(a * s * x)`` of the fused tokens; ``fuse_weight="size"`` weights by size alone, which
    conserves ``sum(s * x)`` over the whole sequence exactly. ``fuse="nearest"`` merges each unkept
    token into its most similar kept one instead, ``fuse="drop"`` drops them. Padding is dropped,
    never fused; if no real token is left to fuse, the fused token is padding (size 0).
    By default it reduces at EViT's layers (:func:`after_mixing`). EViT chose them for keep ratios of 0.5
    to 0.9 per step (about 50-90% of the FLOPs); a ``flops=`` target that needs less adds a step at block 1
    (:class:`EvitLayers`): on the fidelity task at 35% FLOPs, EViT's three layers alone leave 2
    tokens (72.5% top-1) and one more step at block 1 keeps 88% (``benchmarks/RESULTS-fidelity.md``).
    """

    name = "evit"
    description = "keep the tokens the CLS token attends to most, fuse the rest into them (EViT)"
    paper = "Liang et al. 2022, arXiv 2202.07800"
    stages = ("tower", "before_lm", "in_lm")
    published_fuse = "one"
    needs = frozenset({"cls_attention", "attention_received"})
    max_step = 1.0

    def __init__(self, fuse: str = "nearest", fuse_weight: str = "attention"):
        super().__init__(fuse)
        if fuse_weight not in FUSE_WEIGHTS:
            raise ValueError(f"evit: fuse_weight must be one of {FUSE_WEIGHTS}, got {fuse_weight!r}")
        self.fuse_weight = fuse_weight

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        score = attention_scores(self, state, signals)
        kept = top_scores(score, real_tokens(state), num_chosen(state, num_kept, self.fuse))
        dest = fused_dest(state, kept, num_kept, self.fuse, signals.metric)
        weight = None
        if self.fuse == "one" and self.fuse_weight == "attention":
            # Kept tokens keep weight = size (a zero weight would zero their feature); 1e-20 keeps a
            # fused group whose attention underflowed from dividing by zero.
            fused = dest == num_kept - 1   # the last slot holds the fused token alone
            attention = torch.cat([score.new_ones(score.shape[0], state.num_protected), score], dim=1)
            weight = torch.where(fused, state.size * attention.clamp_min(1e-20), state.size)
        return state.reduce(dest, num_kept, weight)


def allocate(weight: Tensor, capacity: Tensor, total: Tensor) -> Tensor:
    """Split ``total`` ``[B]`` tokens across partitions ``[B, P]`` in proportion to ``weight``,
    never giving a partition more than its ``capacity``; integer budgets that sum to ``total``.

    Excess over a capacity is handed on to the other partitions by weight (water filling), then
    budgets are rounded by largest remainder (ties: lower partition id). ``total`` must not exceed
    the summed capacity. A row whose weights are all zero splits in proportion to capacity.
    """
    weight, capacity, total = weight.double(), capacity.double(), total.double()
    if bool((total > capacity.sum(dim=1)).any()):
        raise ValueError("allocate: total must not exceed the summed capacity of the partitions")
    # A tiny share by capacity: partitions with zero weight still absorb what the others cannot.
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-300) + 1e-9 * capacity
    ideal = torch.zeros_like(weight)
    free = capacity > 0
    for _ in range(weight.shape[1]):
        remaining = total - (ideal * ~free).sum(dim=1)
        share = weight * free
        share = remaining[:, None] * share / share.sum(dim=1, keepdim=True).clamp_min(1e-300)
        capped = free & (share >= capacity)
        ideal = torch.where(free, torch.minimum(share, capacity), ideal)
        if not bool(capped.any()):
            break
        free = free & ~capped
    budget = ideal.floor().clamp(max=capacity)
    deficit = (total - budget.sum(dim=1)).round()
    remainder = (ideal - budget).masked_fill(budget >= capacity, -1.0)
    rank = remainder.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    budget = budget + (rank < deficit[:, None]).double()
    return budget.long()


def _num_partitions(partition: Tensor) -> int:
    """Partition ids run from 0 to the largest present; a batch with no images has one (empty) partition,
    so an empty batch flows through the same code and comes out empty."""
    return int(partition.max()) + 1 if partition.numel() else 1


@register
class HiRED(AttentionScored):
    """Token budget split across partitions (crops) by their attention mass, then each partition
    keeps its best tokens (HiRED, Arif et al., "High-Resolution Early Dropping").

    ``signals.partition`` is ``[B, N]`` int64: the partition id (0, 1, ...) of every current token;
    entries of protected tokens are ignored. None means one partition (a plain ViT). The budget of
    ``num_kept`` minus the protected tokens is split by :func:`allocate` in proportion to each
    partition's share of the score (CLS attention, or the fallback score without a CLS token),
    capped by how many real tokens it has; inside a partition the highest-scoring tokens are kept.
    Ids with no tokens get a budget of 0. If the budget exceeds the real tokens, every real token is
    kept and padding fills the rest. ``fuse`` says what happens to the tokens not kept (default
    ``"nearest"``: merged into their most similar kept token). HiRED drops once ("early dropping",
    before the language model); in a ViT its default is one step at a sixth of the depth, as FastV's
    (:func:`once_after_mixing`), after the image is mixed.

    ``allocate_layer``: HiRED allocates early and selects late. On LLaVA-NeXT, where the partitions
    are the thumbnail and the crops, an image's budget is split across its crops by the thumbnail's
    CLS attention at this vision-tower layer (0, as in HiRED's code), and tokens are selected by the
    attention of the layer LLaVA reads. A plain ViT has one partition, so there is nothing to allocate.
    """

    name = "hired"
    description = "split the token budget across partitions by attention mass, keep each one's top tokens (HiRED)"
    paper = "Arif et al. 2024, arXiv 2408.10945"
    stages = ("tower", "before_lm", "in_lm")
    needs = frozenset({"cls_attention", "attention_received", "partition"})
    max_step = 1.0

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return once_after_mixing(num_layers)

    def __init__(self, fuse: str = "nearest", allocate_layer: int = 0):
        super().__init__(fuse)
        self.allocate_layer = check_number(self, "allocate_layer", allocate_layer, "a vision-tower layer index >= 0",
                                           lambda layer: layer >= 0, integer=True)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        budget_total = num_chosen(state, num_kept, self.fuse)
        score, valid = attention_scores(self, state, signals), real_tokens(state)
        partition = self._partition(state, signals)
        num_partitions = _num_partitions(partition)
        capacity = score.new_zeros(score.shape[0], num_partitions).scatter_add_(1, partition, valid.float())
        mass = score.new_zeros(capacity.shape).scatter_add_(1, partition, score)
        total = valid.sum(dim=1).clamp(max=budget_total)
        budget = allocate(mass, capacity, total)

        # Group tokens by partition, best score first inside a group, padding last.
        by_score = score.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)
        order = by_score.gather(1, partition.gather(1, by_score).argsort(dim=1, stable=True))
        group = partition.gather(1, order)
        group_size = torch.zeros_like(budget).scatter_add_(1, partition, torch.ones_like(partition))
        start = group_size.cumsum(dim=1) - group_size
        rank = torch.arange(order.shape[1], device=order.device) - start.gather(1, group)
        chosen = torch.zeros_like(valid).scatter_(1, order, rank < budget.gather(1, group))
        kept = keep_first(chosen.float() * 2 + valid.float(), budget_total)
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)

    def _partition(self, state: TokenState, signals: Signals) -> Tensor:
        batch, unprotected = state.x.shape[0], state.num_tokens - state.num_protected
        if signals.partition is None:
            return torch.zeros(batch, unprotected, dtype=torch.long, device=state.x.device)
        partition = check_signal(self, "partition", signals.partition, state)
        if partition.dim() != 2 or partition.dtype.is_floating_point or partition.dtype == torch.bool:
            raise ValueError(f"hired: signals.partition must be an integer tensor [B, N], got "
                             f"{partition.dtype} of shape {tuple(partition.shape)}")
        partition = partition[:, state.num_protected:].long()
        if bool((partition < 0).any()):
            raise ValueError(f"hired: partition ids must be >= 0, got {int(partition.min())}")
        return partition
