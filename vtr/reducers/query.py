"""Query-conditioned pruning: keep tokens that are relevant to a query *and* not redundant with each
other (after Script, "Graph-Structured and Query-Conditioned Semantic Token Pruning", and DivPrune).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..core.state import TokenState
from .base import Reducer, Signals, check_finite, check_number, register, unit
from .select import check_fuse, check_query, check_signal, fused_dest, fusion_macs, num_chosen, real_tokens, top_scores


@register
class QueryPrune(Reducer):
    """Greedy selection by ``relevance * relevance_weight + novelty * (1 - relevance_weight)``.

    relevance: cosine between each token's features ``state.x`` mapped into the query's space and the
        query ``signals.query`` (``[B, D]``, or ``[B, Q, D]`` with the best of the Q queries), mapped to
        [0, 1]. Set it with ``with vtr.conditioned(model, query): model(x)``; a batch of one query is shared.
        VLMs give it the prompt's text without one: its input embeddings before the LM, and in the LM
        (``layers=[K]``) the text after the image as layer K holds it (the image's tokens are layer K's too).
        The map into the query's space, first that applies:
        1. ``projection`` given to this reducer (an ``nn.Module``/callable ``[B, N, C] -> [B, N, D]`` or
           a ``[C, D]`` matrix). It wins: the user asked for it explicitly (e.g. a probe or a space of
           their own), and an explicit option that the model silently overrode would be a trap.
        2. ``signals.query_projection`` from the adapter: on CLIP-style models the tower's own final
           norm and projection (each token as the image embedding it would give if it were the pooled
           token), so text embeddings, which live in the joint space, compare with tokens like with like.
        3. None: the tokens themselves (query and tokens share a space).
    novelty: the graph criterion. Tokens are nodes of a cosine-similarity graph over
        ``signals.metric``; a token's novelty is its cosine distance (halved, in [0, 1]) to the
        nearest token already kept, so a near-duplicate of a kept token scores ~0 and is pruned.
        Before anything is kept it is the distance to the image's mean token.

    Each step keeps the best token and updates the novelties (max-min diversity). With
    ``relevance_weight=1`` this is top-k by relevance (no graph is built); with 0, or when no query
    is given, it is a pure diversity pruner (DivPrune-like). Padding is chosen last. ``fuse`` says
    what happens to the tokens not kept (default ``"nearest"``: each merges into its most similar kept
    token; ``"drop"`` removes them, as Script and DivPrune do).
    """

    name = "query"
    description = "keep tokens relevant to a query and diverse among themselves (Script/DivPrune-style)"
    paper = "after Script (2025) and DivPrune (Alvar et al. 2025, arXiv 2503.02175)"
    stages = ("tower", "before_lm", "in_lm")
    published_fuse = "drop"   # query-conditioned pruning as published (Script) drops the unkept tokens
    needs = frozenset({"metric", "query"})
    max_step = 1.0

    def __init__(self, relevance_weight: float = 0.5,
                 projection: Optional[Union[Tensor, nn.Module, Callable[[Tensor], Tensor]]] = None,
                 fuse: str = "nearest"):
        super().__init__()
        self.fuse = check_fuse(self, fuse)
        relevance_weight = check_number(self, "relevance_weight", relevance_weight, "in [0, 1]", lambda w: 0 <= w <= 1)
        if projection is not None and not (isinstance(projection, Tensor) or callable(projection)):
            raise ValueError(f"query: projection must be a [C, D] tensor or a callable, got {type(projection).__name__}")
        if isinstance(projection, Tensor) and projection.dim() != 2:
            raise ValueError(f"query: a projection matrix must be [C, D], got {tuple(projection.shape)}")
        if isinstance(projection, Tensor):
            check_finite(self, "projection", projection.detach())
        self.relevance_weight, self.projection = float(relevance_weight), projection

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        """The similarity graph (U^2 d) and the distances to the mean token (2 U d). Not counted: the
        relevance products (U D Q) and the map of the U tokens into the query's space (``projection``
        or the adapter's ``signals.query_projection``: on CLIP the final norm and a C x D projection per
        token, U C D; more for SigLIP's head). Both depend on the query, which the budget does not
        see, so this is a lower bound for a conditioned call; without a query neither is paid."""
        kept = (num_tokens + cost.num_protected) // 2 if num_kept is None else num_kept
        fusion = fusion_macs(num_tokens, kept, cost, self.fuse)
        if self.relevance_weight == 1.0:
            return fusion
        unprotected = num_tokens - cost.num_protected
        return float((unprotected * unprotected + 2 * unprotected) * cost.metric_dim) + fusion

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        k, valid = num_chosen(state, num_kept, self.fuse), real_tokens(state)
        relevance = None if signals.query is None else self.relevance(state, signals.query,
                                                                          signals.query_projection)
        if relevance is not None and self.relevance_weight == 1.0:
            kept = top_scores(relevance, valid, k)
        else:
            weight = 0.0 if relevance is None else self.relevance_weight
            kept = self._greedy(state, signals, valid, k, relevance, weight)
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)

    def relevance(self, state: TokenState, query: Tensor,
                  query_projection: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """``[B, U]`` in [0, 1]: (1 + best cosine over the queries) / 2.

        ``query_projection``: the adapter's map of tokens into the query's space
        (``signals.query_projection``); used unless this reducer was given its own ``projection``.
        """
        tokens = state.x[:, state.num_protected:]
        if isinstance(self.projection, Tensor):
            if self.projection.shape[0] != tokens.shape[-1]:
                raise ValueError(f"query: projection is [{self.projection.shape[0]}, {self.projection.shape[1]}] "
                                 f"but the tokens have width {tokens.shape[-1]}")
            tokens = tokens @ self.projection.to(tokens)
            where = "projected tokens"
        elif self.projection is not None:
            tokens = self.projection(tokens)
            where = "projected tokens"
        elif query_projection is not None:
            tokens = query_projection(tokens)
            where = "tokens mapped by the model's query projection"
        else:
            where = "tokens (give projection= to map them)"
        query = check_query(self, query, tokens, where)
        # Dividing the [B, U, Q] products by the token norms spares a pass over the [B, U, C] tokens.
        tokens = tokens.float()
        cosine = (tokens @ unit(query.to(tokens.device)).transpose(1, 2)).amax(dim=-1)
        return (1.0 + cosine / tokens.norm(dim=-1).clamp_min(1e-6)) / 2

    def _greedy(self, state: TokenState, signals: Signals, valid: Tensor, k: int,
                relevance: Optional[Tensor], weight: float) -> Tensor:
        if signals.metric is None:
            raise ValueError("query needs signals.metric (token features) for its redundancy graph")
        metric = check_signal(self, "metric", signals.metric, state)[:, state.num_protected:].float()
        # Cosines from one Gram matrix and the norms (no normalized copy of the [B, U, D] metric).
        norm = metric.norm(dim=-1).clamp_min(1e-6)
        cosine = (metric @ metric.transpose(1, 2)) / (norm[:, :, None] * norm[:, None, :])
        mean = (state.size[:, state.num_protected:] / norm)[:, None, :] @ metric  # size-weighted, of unit tokens
        to_mean = (metric @ mean.transpose(1, 2))[..., 0] / (norm * mean.norm(dim=-1).clamp_min(1e-6))
        novelty = (1.0 - to_mean) / 2
        base = 0.0 if relevance is None else weight * relevance
        # score[b, i, j]: token j's score once token i is kept. A token's score only falls as tokens
        # are kept (its novelty is a min over kept ones), so one running minimum over the rows of the
        # kept tokens does the whole greedy update: three small ops per kept token. Padding columns
        # score -1 (they fill leftover slots only); the diagonal -2 takes a kept token out for good.
        distance = (1.0 - cosine) / 2  # the similarity graph, as distances
        base_row = base[:, None, :] if relevance is not None else base
        score = (base_row + (1.0 - weight) * distance).masked_fill(~valid[:, None, :], -1.0)
        score.diagonal(dim1=1, dim2=2).fill_(-2.0)
        current = (base + (1.0 - weight) * novelty).masked_fill(~valid, -1.0)
        rows = torch.arange(current.shape[0], device=current.device)
        picks = []
        for _ in range(k):
            pick = current.argmax(dim=1)
            picks.append(pick)
            current = torch.minimum(current, score[rows, pick])
        return torch.stack(picks, dim=1).sort(dim=1).values
