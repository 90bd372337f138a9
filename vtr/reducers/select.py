"""Choosing tokens by score: what every dropping reducer shares.

Scores cover the unprotected tokens (``[B, U]``). Padding (size 0) only ever fills slots that real
tokens cannot, ties go to the earlier position (stable sorts, so choices are deterministic), and
the chosen indices come back in spatial order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals


def keep_first(priority: Tensor, k: int) -> Tensor:
    """Indices ``[B, k]`` of the ``k`` highest ``priority`` entries per row (ties: earlier position),
    sorted by position so the kept tokens keep their spatial order."""
    order = priority.argsort(dim=1, descending=True, stable=True)[:, :k]
    return order.sort(dim=1).values


def top_scores(score: Tensor, valid: Tensor, k: int) -> Tensor:
    """The ``k`` best-scoring real tokens per row; padding (``valid`` False) only fills leftover slots."""
    return keep_first(score.float().masked_fill(~valid, float("-inf")), k)


def real_tokens(state: TokenState) -> Tensor:
    """``[B, U]`` True for the unprotected tokens that are not padding."""
    return state.size[:, state.num_protected:] > 0


def check_signal(reducer: Reducer, name: str, value: Tensor, state: TokenState) -> Tensor:
    """A per-token signal must be ``[B, N, ...]`` with the state's batch and token count."""
    if tuple(value.shape[:2]) != tuple(state.x.shape[:2]):
        raise ValueError(f"{reducer.name}: signals.{name} must start with [B, N] = {tuple(state.x.shape[:2])}, "
                         f"got {tuple(value.shape)}")
    return value


def attention_scores(reducer: Reducer, state: TokenState, signals: Signals) -> Tensor:
    """``[B, U]`` importance of each unprotected token: non-negative, 0 for padding, summing to 1.

    With a CLS token: the attention the CLS token pays to it (head mean, ``signals.cls_attention``).
    Without one (SigLIP-style, mean-pooled models) the fallback is the L2 norm of the token's
    ``signals.metric``: key norms with ``metric="keys"`` (a key with a larger norm draws more
    attention from every aligned query), hidden-state norms with the default ``metric="x"``.
    """
    protected = state.num_protected
    if signals.cls_attention is not None:
        score = check_signal(reducer, "cls_attention", signals.cls_attention, state)[:, protected:].float()
    elif signals.metric is not None:
        score = check_signal(reducer, "metric", signals.metric, state)[:, protected:].float().norm(dim=-1)
    else:
        raise ValueError(f"{reducer.name} needs signals.cls_attention (models with a CLS token) or "
                         "signals.metric (the fallback score for models without one)")
    score = score.masked_fill(~real_tokens(state), 0.0)
    return score / score.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
