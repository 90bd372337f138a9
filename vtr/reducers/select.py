"""Choosing tokens by score: what every dropping reducer shares.

Scores cover the unprotected tokens (``[B, U]``). Padding (size 0) only ever fills slots that real
tokens cannot, ties go to the earlier position (stable sorts, so choices are deterministic), and
the chosen indices come back in spatial order.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals, dest_from_choice, unit


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
    Without one, the attention each token receives in the tower's feature layer where the model offers it
    (``signals.attention_received``: Qwen-VL, LLaVA-OneVision, Gemma 3, SmolVLM before the language model;
    VisPruner's rule for towers without a CLS token). Else (SigLIP-style, mean-pooled models) the fallback is the L2 norm of the token's
    ``signals.metric``: key norms with ``metric="keys"`` (a key with a larger norm draws more
    attention from every aligned query), hidden-state norms with the default ``metric="x"``. On the Qwen2.5-VL
    yardstick the feature norm scored far below random tokens before the LM (evit 43%, fastv 39% at 25% of the
    tokens against 68% for random; benchmarks/RESULTS-vlm-fidelity.md), hence the received attention first.
    """
    protected = state.num_protected
    if signals.cls_attention is not None:
        score = check_signal(reducer, "cls_attention", signals.cls_attention, state)[:, protected:].float()
    elif signals.attention_received is not None:
        score = check_signal(reducer, "attention_received", signals.attention_received, state)[:, protected:].float()
    elif signals.metric is not None:
        score = check_signal(reducer, "metric", signals.metric, state)[:, protected:].float().norm(dim=-1)
    else:
        raise ValueError(f"{reducer.name} needs signals.cls_attention (models with a CLS token) or "
                         "signals.metric (the fallback score for models without one)")
    score = score.masked_fill(~real_tokens(state), 0.0)
    return score / score.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def tower_importance(reducer: Reducer, state: TokenState, signals: Signals) -> Tensor:
    """``[B, U]`` importance by the vision tower's attention, for methods defined on it (VisionZip, VisPruner,
    FasterVLM): the [CLS] row, or, in a tower without a [CLS] token, the attention each token receives
    (``signals.attention_received``, VisPruner's rule for SigLIP towers). Non-negative, 0 for padding, summing to 1.

    Neither offered is an error, not a guess: these methods have no published rule on other signals.
    """
    if signals.cls_attention is not None:
        return attention_scores(reducer, state, signals)
    if signals.attention_received is None:
        raise ValueError(f"{reducer.name} ranks visual tokens by the vision tower's [CLS] attention or, in a tower "
                         "without a [CLS] token, by the attention each token receives; this model offers neither "
                         "here (see the README's list of families and towers that give them)")
    score = check_signal(reducer, "attention_received", signals.attention_received, state)
    score = score[:, state.num_protected:].float().masked_fill(~real_tokens(state), 0.0)
    return score / score.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


# -- what happens to the tokens a dropping reducer does not keep ---------------------------------

FUSE = ("drop", "one", "nearest")


def check_fuse(reducer: Reducer, fuse: str) -> str:
    if fuse not in FUSE:
        raise ValueError(f"{reducer.name}: fuse must be one of {FUSE} (drop the unkept tokens, fuse them into one "
                         f"extra token, or merge each into its most similar kept token), got {fuse!r}")
    return fuse


def num_chosen(state: TokenState, num_kept: int, fuse: str) -> int:
    """Unprotected tokens the reducer chooses to keep: under ``fuse="one"`` the fused token takes a slot."""
    return num_kept - state.num_protected - (1 if fuse == "one" else 0)


def fusion_macs(num_tokens: int, num_kept: int, cost, fuse: str) -> float:
    """MACs of ``fuse="nearest"``: the cosine of every unkept token with every kept one."""
    if fuse != "nearest":
        return 0.0
    kept = num_kept - cost.num_protected
    return float((num_tokens - num_kept) * kept * cost.metric_dim)


def fused_dest(state: TokenState, kept: Tensor, num_kept: int, fuse: str, metric: Optional[Tensor] = None) -> Tensor:
    """Destination map: the ``kept`` tokens keep their places; the other real tokens are dropped
    (``"drop"``), all go into one extra token, the last of the ``num_kept`` (``"one"``, EViT), or each
    merges into the kept token whose ``metric`` is most similar by cosine (``"nearest"``).

    Padding is always dropped. Fused tokens add their size to where they go, so ``"one"`` and
    ``"nearest"`` conserve total size; with size weights they conserve the size-weighted feature sum.
    """
    dest = dest_from_choice(state, kept)
    if fuse == "drop":
        return dest
    protected = state.num_protected
    rest = (dest < 0) & (state.size > 0)
    if fuse == "one":
        return dest.masked_fill(rest, num_kept - 1)
    if metric is None:
        raise ValueError("fuse='nearest' needs signals.metric (the features to compare tokens by)")
    tokens = unit(metric[:, protected:])
    batch, unprotected, width = tokens.shape
    unkept = torch.ones(batch, unprotected, dtype=torch.bool, device=kept.device).scatter_(1, kept, False)
    # [B, U - K]: the unkept positions (the same count in every row), by a sort: no data-dependent shape
    others = unkept.byte().argsort(dim=1, descending=True, stable=True)[:, :unprotected - kept.shape[1]]
    pick = lambda index: tokens.gather(1, index[..., None].expand(-1, -1, width))   # noqa: E731
    similarity = pick(others) @ pick(kept).transpose(1, 2)                  # [B, U - K, K]
    is_real = state.size[:, protected:].gather(1, kept) > 0                 # padding fills slots only
    nearest = similarity.masked_fill(~is_real[:, None, :], float("-inf")).argmax(dim=-1)
    into = dest.clone()
    into[:, protected:] = into[:, protected:].scatter(1, others, protected + nearest)
    return torch.where(rest, into, dest)


def check_decision_inputs(reducer: Reducer, state: TokenState, **signals: Optional[Tensor]) -> None:
    """The signals a decision reads (a score, a metric) must be finite on the real tokens: top-k, argmax and
    greedy selection on NaN pick arbitrary, even repeated, tokens without a word. One host sync per step.

    Padding is masked rather than indexed out (a boolean index is a ``nonzero``, whose shape depends on data), and
    a weightless copy on the meta device has no values to check: a fixed-budget method then profiles on the meta
    device like any other (``vtr.profile_model`` without inputs)."""
    real = state.size > 0
    for name, value in signals.items():
        if value is None or value.device.type == "meta":
            continue
        per_token = value.shape[:2] == real.shape
        finite = torch.isfinite(value)
        if per_token:
            finite = finite | ~real.view(*real.shape, *([1] * (value.dim() - 2)))
        if not bool(finite.all()):
            values = value[real] if per_token else value
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(f"{reducer.name}: signals.{name} must be finite on the real tokens, got {bad} NaN or Inf "
                             f"of {values.numel()} values")


def check_query(reducer: Reducer, query: Tensor, tokens: Tensor, what: str = "tokens") -> Tensor:
    """``signals.query`` as ``[B or 1, Q, D]`` (a ``[B, D]`` query is one per image), checked against the ``tokens``
    ``[B, U, D]`` it is compared with (``what`` names them in the error): one query per image or one for all."""
    query = query[:, None] if query.dim() == 2 else query
    if query.dim() != 3 or query.shape[1] == 0:
        raise ValueError(f"{reducer.name}: signals.query must be [B, D] or [B, Q, D] with Q >= 1, got "
                         f"{tuple(query.shape)}")
    if query.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"{reducer.name}: the query has width {query.shape[-1]} but the {what} have width "
                         f"{tokens.shape[-1]}")
    if query.shape[0] not in (1, tokens.shape[0]):
        raise ValueError(f"{reducer.name}: signals.query has {query.shape[0]} rows for a batch of {tokens.shape[0]}; "
                         "give one query per image (or one for all)")
    return query


def unit_rows(metric: Tensor) -> Tensor:
    """Rows scaled to unit length for cosine similarity: float64 stays float64 (a reference test's decisions then
    never hinge on float32 rounding), anything else is computed in float32 (:func:`~vtr.reducers.base.unit`)."""
    if metric.dtype == torch.float64:
        return torch.nn.functional.normalize(metric, dim=-1, eps=1e-6)
    return unit(metric)
