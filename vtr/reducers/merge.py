"""Merging reducers: bipartite soft matching (ToMe) and energy-based merging (PiToMe)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..core.state import TokenState
from .base import Reducer, Signals, check_number, dest_from_choice, register, unit
from .select import real_tokens


def _require_metric(reducer: Reducer, signals: Signals, state: TokenState) -> torch.Tensor:
    metric = signals.metric
    if metric is None:
        raise ValueError(f"{reducer.name} needs signals.metric ([B, N, D] features to compare tokens by)")
    if metric.shape[:2] != state.x.shape[:2]:
        raise ValueError(
            f"{reducer.name}: signals.metric must be [B, N, D] with B, N = {tuple(state.x.shape[:2])}, "
            f"got {tuple(metric.shape)}"
        )
    return metric


@register
class ToMe(Reducer):
    """Bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster").

    Unprotected tokens alternate into sets A and B by position; each A token finds its most similar
    B token (cosine of the metric); the r most similar pairs merge by size-weighted average. At most
    half of the unprotected tokens go per step. Padding (size 0) in A merges away first and is never
    a merge target while a real B token exists; it weighs nothing either way.
    """

    name = "tome"
    description = "bipartite soft matching: merge the r most similar A->B pairs (ToMe)"
    paper = "Bolya et al. 2022, arXiv 2210.09461"
    stages = ("tower", "before_lm", "in_lm")
    needs = frozenset({"metric"})
    max_step = 0.5

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        unprotected = num_tokens - cost.num_protected
        return float((unprotected + 1) // 2 * (unprotected // 2) * cost.metric_dim)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        r = state.num_tokens - num_kept
        metric = unit(_require_metric(self, signals, state)[:, state.num_protected:])
        padding = ~real_tokens(state)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        scores = scores.masked_fill(padding[:, None, 1::2], float("-inf"))
        scores = scores.masked_fill(padding[:, ::2, None], float("inf"))

        best_score, best_b = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True, stable=True)
        merged_a, kept_a = order[:, :r], order[:, r:]
        num_b = scores.shape[2]
        all_b = torch.arange(num_b, device=order.device).expand(order.shape[0], num_b)
        kept = torch.cat([2 * kept_a, 2 * all_b + 1], dim=1).sort(dim=1).values
        dest = dest_from_choice(state, kept, 2 * merged_a, 2 * best_b.gather(1, merged_a) + 1)
        return state.reduce(dest, num_kept)


PITOME_VARIANTS = ("energy", "paper")


@register
class PiToMe(Reducer):
    """Energy-based merging after PiToMe (Tran et al., "Accelerating Transformers with
    Spectrum-Preserving Token Merging").

    Energy of a token = mean over tokens of ELU(cos - margin): high for members of large clusters
    of similar tokens (redundant), low for isolated ones (informative). The margin decays linearly
    with depth, ``margin * (1 - layer / num_layers)``, so later layers merge more selectively.

    ``variant="energy"`` (default; PiToMe's own merging step, margin 0.9): the 2r highest-energy tokens
    are split alternately by energy rank into A and B, every A token merges into its most similar B
    token, and all other tokens (the isolated ones) pass through.

    ``variant="paper"`` runs what the paper's released ViT code runs. In the first half of the layers
    (``layer < ceil(num_layers / 2)``) every token is split alternately by energy rank into A and B, and
    the r A tokens whose best B match is the most similar merge into it (bipartite matching ordered by
    energy; no token is kept out for being isolated); later layers take the energy step. Margin 0.75,
    and, unless given to ``vtr.patch``, attention keys as the metric and no proportional attention
    (:meth:`patch_defaults`).
    """

    name = "pitome"
    description = "energy-based merging: protect isolated tokens, merge within large clusters (PiToMe)"
    paper = "Tran et al. 2024, arXiv 2405.16148"
    stages = ("tower", "before_lm", "in_lm")
    needs = frozenset({"metric"})
    max_step = 0.5

    def __init__(self, margin: Optional[float] = None, alpha: float = 1.0, variant: str = "energy"):
        super().__init__()
        if variant not in PITOME_VARIANTS:
            raise ValueError(f"pitome: variant must be one of {PITOME_VARIANTS}, got {variant!r}")
        if margin is None:
            margin = 0.75 if variant == "paper" else 0.9
        margin = check_number(self, "margin", margin, "in [0, 1)", lambda m: 0 <= m < 1)
        alpha = check_number(self, "alpha", alpha, "a finite number > 0", lambda a: a > 0)
        self.margin, self.alpha, self.variant = margin, alpha, variant

    def patch_defaults(self) -> dict:
        """The released ViT code compares attention keys and leaves attention unweighted by size."""
        return {"metric": "keys", "prop_attn": False} if self.variant == "paper" else {}

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        unprotected = num_tokens - cost.num_protected
        return float(unprotected * unprotected * cost.metric_dim)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        r = state.num_tokens - num_kept
        metric = unit(_require_metric(self, signals, state)[:, state.num_protected:])
        valid = real_tokens(state).float()
        sim = metric @ metric.transpose(1, 2)
        margin = self.margin * (1.0 - signals.layer / max(signals.num_layers, 1))
        energy = (F.elu(sim - margin, alpha=self.alpha) * valid[:, None, :]).sum(-1) / valid.sum(-1, keepdim=True)
        energy = energy.masked_fill(valid == 0, float("inf"))  # padding merges away first
        order = energy.argsort(dim=-1, descending=True, stable=True)
        if self.variant == "paper" and signals.layer < math.ceil(signals.num_layers / 2):
            dest = _matched_by_energy(state, r, sim, order, valid == 0)
        else:
            dest = _merged_in_clusters(state, r, sim, order, valid == 0)
        return state.reduce(dest, num_kept)


def _merged_in_clusters(state: TokenState, r: int, sim: torch.Tensor, order: torch.Tensor,
                        padding: torch.Tensor) -> torch.Tensor:
    """PiToMe's step: the 2r highest-energy tokens alternate into A and B by energy rank, each A token
    merges into its most similar B token; the rest (``order[2r:]``, the isolated tokens) pass through."""
    a_idx, b_idx = order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2]
    sim_ab = _rows_cols(sim, a_idx, b_idx).masked_fill(padding.gather(1, b_idx)[:, None, :], float("-inf"))
    into = b_idx.gather(1, sim_ab.argmax(dim=-1))
    kept = torch.cat([order[:, 2 * r :], b_idx], dim=1).sort(dim=1).values
    return dest_from_choice(state, kept, a_idx, into)


def _matched_by_energy(state: TokenState, r: int, sim: torch.Tensor, order: torch.Tensor,
                       padding: torch.Tensor) -> torch.Tensor:
    """The released ViT code's first-half step: every token alternates into A and B by energy rank,
    and the r A tokens with the most similar best B match merge into it (padding in A first, never
    into padding while a real B token exists)."""
    a_idx, b_idx = order[:, ::2], order[:, 1::2]
    scores = _rows_cols(sim, a_idx, b_idx)
    scores = scores.masked_fill(padding.gather(1, b_idx)[:, None, :], float("-inf"))
    scores = scores.masked_fill(padding.gather(1, a_idx)[:, :, None], float("inf"))
    best_score, best_b = scores.max(dim=-1)
    edges = best_score.argsort(dim=-1, descending=True, stable=True)
    merged, unmerged = edges[:, :r], edges[:, r:]
    into = b_idx.gather(1, best_b.gather(1, merged))
    kept = torch.cat([a_idx.gather(1, unmerged), b_idx], dim=1).sort(dim=1).values
    return dest_from_choice(state, kept, a_idx.gather(1, merged), into)


def _rows_cols(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``sim[b, rows[b]][:, cols[b]]`` for every batch row ``b``: ``[B, len(rows), len(cols)]``."""
    picked = sim.gather(1, rows[:, :, None].expand(-1, -1, sim.shape[2]))
    return picked.gather(2, cols[:, None, :].expand(-1, rows.shape[1], -1))
