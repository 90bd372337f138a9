"""TCA's domain-aware token condensation inside an open_clip ViT image tower (Wang et al., arXiv 2410.14729).

At each condensation block (by default a quarter, half and three quarters of the depth: 3, 6, 9 of 12, as the
paper's ViT-B/16) the block attends with the *domain anchor* of the class whose anchor is closest (cosine) to the
image's CLS token prepended as an extra token: every token attends to it too (its own output row is dropped).
Between the attention residual and the MLP the patch tokens are condensed, with ``n`` patch tokens and rate
``R`` (the official counts): ``left = ceil((1 - R) n)``, ``m = n + 1 - left``;

- the ``left - 2m`` tokens the CLS token attends to most are kept. "Most" is the paper's cross-head consensus:
  each head ranks the tokens by its CLS attention and the ranks are averaged over heads (ties: mean attention);
- the next ``2m`` (class-ambiguous) tokens are merged into ``centers`` representative tokens: greedy k-center
  selection (from the best-ranked ambiguous token; the official code starts at a random one), each token joins
  its nearest center, and each group is averaged with weights 1 for the center and ``1 / distance`` for the
  others, normalised (the official coreset averaging);
- the remaining ``n - left`` (class-irrelevant) tokens are fused into one token, their sum weighted by the CLS
  attention (mean over heads, not renormalised, as EViT's fused token).

The order after a condensation is ``[CLS, kept (by rank), centers, fused]``. The forward is written out with
matrix products (``nn.MultiheadAttention``'s weights, eager softmax) so torch's FLOP counter sees every product,
distances included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Encoded:
    """What one pass of the tower gives: the image embedding ``[B, E]``, the CLS token after every block
    ``[B, L, D]`` and the number of tokens entering each block, then the final count."""

    features: Tensor
    cls_tokens: Tensor
    tokens: list


def check_tower(visual: nn.Module) -> None:
    """Refuse a tower whose forward :func:`encode` would not reproduce exactly."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if type(visual) is not VisionTransformer:
        raise ValueError(f"TCA runs open_clip's VisionTransformer image tower, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError("TCA needs CLS-token pooling ('tok', final norm before pooling, no attentional pooler)")
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock or not block.attn.batch_first:
            raise ValueError(f"TCA: resblocks[{i}] is {type(block).__name__}; it needs open_clip's "
                             "ResidualAttentionBlock with a batch-first nn.MultiheadAttention")


def default_layers(depth: int) -> tuple[int, ...]:
    """The paper's condensation blocks 3, 6, 9 of 12 as fractions of the depth (2, 4, 6 of 8)."""
    return tuple(sorted({max(1, depth * k // 4) for k in (1, 2, 3)} - {depth}))


def _attention(block: nn.Module, x: Tensor, anchor: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The block's attention output for ``x`` ``[B, N, D]`` (with ``anchor`` ``[B, D]`` prepended as an extra
    key/value, its own row dropped) and the CLS row's attention over ``x``'s patch tokens ``[B, H, N - 1]``."""
    attn = block.attn
    seq = x if anchor is None else torch.cat([anchor[:, None], x], dim=1)
    b, n, d = seq.shape
    h = attn.num_heads
    q, k, v = F.linear(block.ln_1(seq), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, d)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    first = 0 if anchor is None else 1
    return out[:, first:], weights[:, :, first, first + 1:]


def _ranking(cls_attention: Tensor) -> Tensor:
    """Patch indices ``[B, n]`` best first: by the rank averaged over heads, ties by the mean attention."""
    per_head_rank = cls_attention.argsort(dim=-1).argsort(dim=-1).to(torch.float64)   # 0 = least attended
    mean_rank = per_head_rank.mean(1)
    by_attention = cls_attention.mean(1).argsort(dim=-1, descending=True, stable=True)
    order = mean_rank.gather(1, by_attention).argsort(dim=-1, descending=True, stable=True)
    return by_attention.gather(1, order)


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``|a_i - b_j|^2`` as a matrix product (so the FLOP counter sees it), clamped at 0."""
    return ((a * a).sum(-1)[:, None] + (b * b).sum(-1)[None] - 2 * a @ b.t()).clamp_min(0)


def coreset_average(tokens: Tensor, centers: int) -> Tensor:
    """Merge ``tokens`` ``[M, D]`` (best-ranked first) into ``min(centers, M)`` tokens: greedy k-center
    selection from the first token, nearest-center groups, inverse-distance weights (1 for the center)."""
    count = min(centers, tokens.shape[0])
    chosen = [0]
    nearest = _squared_distances(tokens, tokens[:1])[:, 0]
    for _ in range(count - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, _squared_distances(tokens, tokens[chosen[-1]:chosen[-1] + 1])[:, 0])
    distance = _squared_distances(tokens, tokens[chosen]).sqrt()            # [M, count]
    group = distance.argmin(1)
    is_center = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    is_center[chosen] = True
    own = distance.gather(1, group[:, None])[:, 0]
    weight = torch.where(is_center | (own == 0), torch.ones_like(own), 1 / own.clamp_min(1e-12))
    one_hot = F.one_hot(group, count).to(tokens.dtype) * weight[:, None]    # [M, count]
    return (one_hot.t() @ tokens) / one_hot.sum(0)[:, None]


def condense(x: Tensor, cls_attention: Tensor, rate: float, centers: int) -> Tensor:
    """Condense ``x`` ``[B, N, D]`` (CLS first) by the CLS attention ``[B, H, N - 1]`` (module docstring)."""
    b, n_all, d = x.shape
    n = n_all - 1
    left = math.ceil((1 - rate) * n)
    merged = n + 1 - left
    keep = left - 2 * merged
    if keep < 0:
        raise ValueError(f"rate={rate} leaves too few tokens to condense {n} patch tokens (keeps {left}, merges "
                         f"{2 * merged}); use a smaller rate or fewer condensation layers")
    order = _ranking(cls_attention)
    patches = x[:, 1:]
    rows = []
    for i in range(b):
        ranked = patches[i, order[i]]
        parts = [x[i, :1], ranked[:keep], coreset_average(ranked[keep:left], centers)]
        if left < n:
            weight = cls_attention[i].mean(0)[order[i, left:]]
            parts.append((weight[None] @ ranked[left:]))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def encode(visual: nn.Module, images: Tensor, anchors: Optional[Tensor] = None, rate: float = 0.0,
           layers: Sequence[int] = (), centers: int = 4) -> Encoded:
    """Run the image tower on ``images`` with condensation at ``layers`` (``rate`` 0: none) and, there, the
    closest of ``anchors`` ``[K, L, D]`` (per-class mean CLS tokens after each block) prepended. The anchor
    for block ``l`` is the CLS token after block ``l - 1``, the one entering block ``l``."""
    x = visual._embeds(images)
    tokens, cls_tokens = [], []
    for index, block in enumerate(visual.transformer.resblocks):
        tokens.append(x.shape[1])
        here = index in layers and rate > 0     # the official code prepends anchors only where it condenses
        anchor = None
        if here and anchors is not None:
            pool = anchors[:, index - 1].to(x.dtype)                                    # [K, D]
            best = F.normalize(x[:, 0], dim=-1) @ F.normalize(pool, dim=-1).t()        # [B, K]
            anchor = pool[best.argmax(1)]
        out, cls_attention = _attention(block, x, anchor)
        x = x + block.ls_1(out)
        if here:
            x = condense(x, cls_attention, rate, centers)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        cls_tokens.append(x[:, 0])
    tokens.append(x.shape[1])
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return Encoded(pooled, torch.stack(cls_tokens, dim=1), tokens)


__all__ = ["Encoded", "check_tower", "default_layers", "coreset_average", "condense", "encode"]
