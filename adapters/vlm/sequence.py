"""The sequence in-LLM pruning hands each segment of decoder layers: which prompt columns it holds, their
rotary embeddings and causal masks gathered for it, and the last prompt token's attention that ranks the
visual tokens (recomputed from a layer's own projections, so any attention kernel works)."""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.core.signals import cls_attention

from .language import decoder


def real_columns(real: Tensor) -> Tensor:
    """``[B, L]`` column of each position, -1 where ``real`` is False (padding)."""
    return torch.arange(real.shape[1], device=real.device).expand(real.shape).masked_fill(~real, -1)


def slot_of_column(columns: Tensor, length: int) -> Tensor:
    """``[B, length]`` slot of each prompt column in a sequence whose slots hold ``columns``
    (``[B, L']``, -1 padding); -1 for columns the sequence no longer holds."""
    valid = columns >= 0
    slot = torch.full((columns.shape[0], length), -1, dtype=torch.long, device=columns.device)
    slots = torch.arange(columns.shape[1], device=columns.device).expand_as(columns)
    rows = torch.arange(columns.shape[0], device=columns.device)[:, None].expand_as(columns)
    slot[rows[valid], columns[valid]] = slots[valid]
    return slot


def gather_slots(values: Tensor, index: Tensor) -> Tensor:
    """``values`` ``[B or 1, L, ...]`` at ``index`` ``[B, L']`` along dim 1."""
    values = values.expand(index.shape[0], *values.shape[1:])
    return values.gather(1, index.view(*index.shape, *[1] * (values.dim() - 2)).expand(-1, -1, *values.shape[2:]))


def padding_mask(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """``[B, L]`` real tokens of a prompt sent on an empty cache. generate() with a static cache
    passes a ready 4-D mask ``[B, 1, L, W]`` (Qwen-VL: in a dict by attention type): a real token is one
    that may attend to itself."""
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask["full_attention"]
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.dim() == 4:
        diagonal = attention_mask[:, 0, :, :input_ids.shape[1]].diagonal(dim1=-2, dim2=-1)
        return (diagonal if diagonal.dtype == torch.bool else diagonal == 0).long()
    return attention_mask


def layer_keys(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``[B, L, Hk * d]`` the attention keys the layer computes for every position (its input norm, ``k_proj`` and
    rotary embedding; heads concatenated, as DART's code reads them)."""
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    batch, length, _ = hidden.shape
    k = attn.k_proj(layer.input_layernorm(hidden)).view(batch, length, -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:   # Qwen3, Gemma 3: per-head RMSNorm of k before rotary
        k = attn.k_norm(k)
    k = rotate(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[0]
    return k.transpose(1, 2).reshape(batch, length, -1)


def rows_attention(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, real: Tensor, rows: Tensor,
                   window: Optional[int] = None) -> Tensor:
    """``[B, T, L]`` head-mean attention of the positions ``rows`` ``[B, T]`` to every position, each row a softmax
    over its own causal prefix (real positions only; with ``window``, the last ``window`` slots of it, as a
    sliding-window layer sees), from the layer's own norm, q/k projections (and per-head q/k norms, where it has
    them) and rotary embedding: T query rows, O(T L d), whatever kernel the layer runs."""
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    batch, length, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    picked = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(picked).view(batch, rows.shape[1], -1, attn.head_dim)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    at = lambda table: table.expand(batch, *table.shape[1:]).gather(   # noqa: E731
        1, rows[..., None].expand(-1, -1, table.shape[-1]))
    q = rotate(q, q, at(cos), at(sin))[0]
    k = rotate(k, k, cos, sin)[0].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    keys = torch.arange(length, device=rows.device)[None, None, :]
    allowed = real[:, None, :] & (keys <= rows[..., None])
    if window is not None:
        allowed = allowed & (keys > rows[..., None] - window)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling + additive(allowed, torch.float32)
    return logits.softmax(dim=-1).mean(dim=1)


def last_token_attention(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, real: Tensor,
                         window: Optional[int] = None) -> Tensor:
    """Head-mean attention of the last position to every position ``[B, L]``, from the layer's own
    norm, q/k projections (and per-head q/k norms, where it has them) and rotary embedding (what its attention
    computes, one query row only); ``window``: a sliding-window layer's, the last position sees only the last
    ``window`` slots (the rest get 0)."""
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    batch, length, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[:, -1:]).view(batch, 1, -1, attn.head_dim)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:   # Qwen3 (and Qwen3-VL): per-head RMSNorm of q and k before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q = rotate(q, q, cos[:, -1:], sin[:, -1:])[0]
    k = rotate(k, k, cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if window is not None:
        real = real & (torch.arange(length, device=real.device) > length - 1 - window)
    return cls_attention(q, k, additive(real[:, None, None, :], torch.float32), scale=attn.scaling)


def segment_mask(valid: Tensor, cache, layer: int, query_length: int, dtype: torch.dtype) -> Tensor:
    """Mask ``[B, 1, Q, W]`` of Q new tokens over a segment's own cache at ``layer``: its prompt slots
    (``valid`` ``[B, L_i]``), then the tokens generated since, causal; W is the width the cache
    returns (a static cache's slots past its length are masked)."""
    past = int(cache.get_seq_length(layer)) if cache is not None else 0
    width = int(cache.get_mask_sizes(query_length, layer)[0]) if cache is not None else past + query_length
    keys = torch.arange(width, device=valid.device)
    queries = past + torch.arange(query_length, device=valid.device)
    slots = torch.ones(valid.shape[0], width, dtype=torch.bool, device=valid.device)
    slots[:, :valid.shape[1]] = valid
    return additive(slots[:, None, :] & (keys[None, :] <= queries[:, None])[None], dtype)


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean ``[B, Q, K]`` (or ``[B, 1, 1, K]``) allowed-mask as an additive float mask ``[B, 1, Q, K]``."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask if mask.dim() == 4 else mask[:, None]


def scoring_macs(model: nn.Module, layer: int, num_tokens: Tensor) -> float:
    attn = decoder(model).layers[layer].self_attn
    per_row = attn.k_proj.in_features * (attn.k_proj.out_features * num_tokens.double() + attn.q_proj.out_features)
    return float(per_row.sum())
