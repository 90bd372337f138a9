"""Conditional DPP pruning before the language model (CDPruner: Zhang et al., "Beyond Attention or Similarity:
Maximizing Conditional Diversity for Token Pruning in MLLMs", arXiv 2506.10967; code github.com/Theia-4869/CDPruner).

The kept set maximises the determinant of a kernel that couples instruction relevance with feature
similarity, ``L = diag(r) S diag(r)``: ``S`` the cosine similarity of the visual tokens (the projector's outputs,
as the official code), ``r`` each token's relevance to the instruction. The determinant is maximised greedily, one
token at a time, with the incremental Cholesky update of Chen et al. (fast greedy MAP inference, arXiv 1709.05135),
as the official code does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals, register
from .select import check_fuse, check_signal, fused_dest, fusion_macs, num_chosen, real_tokens

DEGENERATE = 1e-10   # a gain below this fraction of the largest first gain: the kernel's rank is exhausted


@register
class CDPruner(Reducer):
    """Greedy MAP of the conditional DPP ``L = diag(r) S diag(r)`` over the visual tokens, the rest dropped.

    relevance ``r``: the instruction comes as ``signals.query`` ``[B, Q, D]`` (on a VLM: the language model's input
    embeddings of the prompt's text tokens, or the query given with ``vtr.conditioned``; the official code encodes
    the question with CLIP's text tower). A token's relevance is the mean over the Q query rows of its cosine with
    each, negated as in the official code (``negate=True``: ``relevance = (-relevance).mean(dim=-1)``), then
    min-max normalised over the image's tokens, ``(r - min + 1e-6) / (max - min)``. The official code takes min and
    max over the whole batch; here over each image, so an image's choice does not depend on the others in the batch.
    Without a query every relevance is 1 (a DPP over similarity alone).

    The greedy step picks the token with the largest remaining gain ``d_j^2`` (the determinant's growth), then
    updates every gain by the new Cholesky row ``e = (L[j] - c_j . C) / d_j``, ``d^2 -= e^2``. When every gain is
    exhausted (more tokens asked for than the kernel's rank), the rest are taken by relevance. Padding is chosen
    last. ``fuse`` (default ``"drop"``, as published) says what happens to the tokens not kept.
    """

    name = "cdpruner"
    description = "greedy MAP of a DPP over instruction relevance and token similarity (CDPruner)"
    paper = "Zhang et al. 2025, arXiv 2506.10967"
    stages = ("before_lm",)
    needs = frozenset({"metric", "query"})
    published_fuse = "drop"
    max_step = 1.0

    def __init__(self, negate: bool = True, fuse: str = "drop"):
        super().__init__()
        if not isinstance(negate, bool):
            raise ValueError(f"cdpruner: negate must be True or False (rank relevance by the negative cosine, as the "
                             f"official code, or by the cosine), got {negate!r}")
        self.negate, self.fuse = negate, check_fuse(self, fuse)

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        """The similarity matrix (U^2 d) and the greedy updates (about k^2 U / 2 for k kept); the relevance
        products depend on the query's length, which the budget does not see (not counted)."""
        kept = (num_tokens + cost.num_protected) // 2 if num_kept is None else num_kept
        unprotected, chosen = num_tokens - cost.num_protected, kept - cost.num_protected
        return float(unprotected * unprotected * cost.metric_dim + chosen * chosen * unprotected / 2) + \
            fusion_macs(num_tokens, kept, cost, self.fuse)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        if signals.metric is None:
            raise ValueError("cdpruner needs signals.metric (token features) for its similarity kernel")
        metric = check_signal(self, "metric", signals.metric, state)[:, state.num_protected:]
        valid = real_tokens(state)
        relevance = self.relevance(state, signals.query, valid)
        features = metric.double()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kept = greedy_map(kernel(features, relevance), valid, num_chosen(state, num_kept, self.fuse))
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)

    def relevance(self, state: TokenState, query: Optional[Tensor], valid: Tensor) -> Tensor:
        """``[B, U]`` float64 relevance of each unprotected token to the instruction (1 without one)."""
        tokens = state.x[:, state.num_protected:]
        if query is None:
            return torch.ones(tokens.shape[:2], dtype=torch.float64, device=tokens.device)
        query = query[:, None] if query.dim() == 2 else query
        if query.dim() != 3 or query.shape[1] == 0:
            raise ValueError(f"cdpruner: signals.query must be [B, D] or [B, Q, D] with Q >= 1, got "
                             f"{tuple(query.shape)}")
        if query.shape[-1] != tokens.shape[-1]:
            raise ValueError(f"cdpruner: the query has width {query.shape[-1]} but the tokens have width "
                             f"{tokens.shape[-1]}")
        if query.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(f"cdpruner: signals.query has {query.shape[0]} rows for a batch of {tokens.shape[0]}; "
                             "give one query per image (or one for all)")
        tokens, query = tokens.double(), query.to(tokens.device).double()
        cosine = (tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ \
            (query / query.norm(dim=-1, keepdim=True).clamp_min(1e-12)).transpose(1, 2)   # [B, U, Q]
        relevance = (-cosine if self.negate else cosine).mean(dim=-1)
        low = relevance.masked_fill(~valid, float("inf")).amin(dim=1, keepdim=True)
        high = relevance.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True)
        spread = (high - low)
        # one real token (or all alike): nothing to tell apart, every relevance 1
        scaled = torch.where(spread > 0, (relevance - low + 1e-6) / spread.clamp_min(1e-300),
                             torch.ones_like(relevance))
        return scaled.masked_fill(~valid, 0.0)


def kernel(unit_features: Tensor, relevance: Tensor) -> Tensor:
    """``L = diag(r) S diag(r)`` ``[B, U, U]`` from unit-length features ``[B, U, d]`` and relevance ``[B, U]``."""
    similarity = unit_features @ unit_features.transpose(1, 2)
    similarity.diagonal(dim1=1, dim2=2).fill_(1.0)   # a token's cosine with itself, exactly: equal gains tie exactly
    return relevance[:, :, None] * similarity * relevance[:, None, :]


def greedy_map(kernel: Tensor, valid: Tensor, k: int) -> Tensor:
    """Fast greedy MAP inference of a DPP with kernel ``[B, U, U]``: ``k`` indices per row, in position order.

    Each step takes the largest remaining gain ``d^2`` (ties: the earlier position) and updates the gains by the
    new Cholesky row. Padding (``valid`` False) is never chosen while a real token is left; once the real tokens'
    gains are exhausted (rank reached), the remaining real tokens follow by their kernel diagonal (relevance^2).
    """
    batch, size, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    gains = kernel.diagonal(dim1=1, dim2=2).clone()
    scale = gains.masked_fill(~valid, 0.0).amax(dim=1).clamp_min(1e-300)
    fallback = gains.clone()                                   # relevance^2: the order once the rank is exhausted
    chosen = torch.zeros(batch, size, dtype=torch.bool, device=kernel.device)
    rows_c = kernel.new_zeros(k, batch, size)                  # the Cholesky rows c_i of the chosen tokens
    picks = []
    for i in range(k):
        exhausted = (gains.masked_fill(chosen | ~valid, float("-inf")).amax(dim=1) <= DEGENERATE * scale)
        # priority: real tokens by gain (or by relevance once exhausted), then padding by position
        score = torch.where(exhausted[:, None], fallback, gains)
        score = score.masked_fill(~valid, float("-inf")).masked_fill(chosen, float("nan"))
        order = torch.where(torch.isnan(score), torch.full_like(score, -3.0),
                            torch.where(torch.isinf(score), torch.full_like(score, -2.0), score.clamp_min(-1.0)))
        pick = order.argmax(dim=1)
        picks.append(pick)
        gain = gains[rows, pick]
        live = ~exhausted & valid[rows, pick] & (gain > 0)
        denominator = gain.clamp_min(1e-300).sqrt()
        update = (kernel[rows, pick] - torch.einsum("tb,tbn->bn", rows_c[:i, rows, pick], rows_c[:i])) \
            / denominator[:, None]
        update = torch.where(live[:, None], update, torch.zeros_like(update))
        rows_c[i] = update
        gains = gains - update.square()
        chosen[rows, pick] = True
    return torch.stack(picks, dim=1).sort(dim=1).values
