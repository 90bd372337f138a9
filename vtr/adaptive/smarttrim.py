"""SmartTrim (Wang et al., "SmartTrim: Adaptive Tokens and Attention Pruning for Efficient Vision-Language
Models", arXiv 2305.15033), on a ViT.

Every block gets two light learned **trimmers**, adaptive per image:

- a **token trimmer** (before the attention) scores each token from its features and the mean of the
  image's kept tokens; a token it prunes is gone for this and every later block (the class token, every
  protected token, stays);
- a **head trimmer** scores every attention head from the mean of the kept tokens; a pruned head is
  **removed from the projections** at inference: the block runs ``qkv`` on the kept heads' rows only, the
  attention on those heads, and ``proj`` on their columns, with the fused attention kernel (nothing is
  masked, and the FLOP counter sees the smaller matrices).

Training (the backbone may train too: SmartTrim fine-tunes it; ``vtr.adaptive.trainable`` trains the
trimmers only): hard Gumbel-sigmoid decisions with a straight-through gradient; pruned tokens are masked
as keys (weight 1e-6) and pruned heads' outputs multiplied by 0, so training computes what inference
computes. The self-distillation teacher is the same model untrimmed (``vtr.adaptive.complete``), and
:func:`vtr.adaptive.flops_loss` pulls the expected cost (from the decisions, differentiable) to ``flops``.

Inference runs each image on its own (its kept tokens and kept heads differ from the next image's): exact
FLOPs per image, rows independent, slower per image than a batch on a large machine.
Trimmers start at "keep everything" (last layer zero, bias ``start`` = 3: under the training noise sigmoid(3) =
95% is kept), so the untrained patched model is the backbone. A lower ``start`` lets the cost fall sooner: AdamW
moves the bias by about the learning rate per step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..adapters.base import Swapped
from . import calls

MASK_FLOOR = 1e-6


def _keep_all(linear: nn.Linear, start: float) -> None:
    nn.init.zeros_(linear.weight)
    nn.init.constant_(linear.bias, start)


class TokenTrimmer(nn.Module):
    """Keep logit per token from ``[its features, the mean of the kept tokens]`` (an MLP of width/2)."""

    def __init__(self, width: int, start: float):
        super().__init__()
        hidden = max(width // 2, 1)
        self.norm = nn.LayerNorm(width)
        self.score = nn.Sequential(nn.Linear(2 * width, hidden), nn.GELU(), nn.Linear(hidden, 1))
        _keep_all(self.score[-1], start)

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x`` ``[B, N, C]``, ``weight`` ``[B, N]`` (1: kept so far) -> logits ``[B, N]``."""
        x = self.norm(x)
        summary = (x * weight[..., None]).sum(1, keepdim=True) / weight.sum(1)[:, None, None].clamp_min(1e-6)
        return self.score(torch.cat([x, summary.expand_as(x)], dim=-1)).squeeze(-1)


class HeadTrimmer(nn.Module):
    """Keep logit per attention head from the mean of the kept tokens."""

    def __init__(self, width: int, num_heads: int, start: float):
        super().__init__()
        hidden = max(width // 2, 1)
        self.score = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                                   nn.Linear(hidden, num_heads))
        _keep_all(self.score[-1], start)

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        mean = (x * weight[..., None]).sum(1) / weight.sum(1)[:, None].clamp_min(1e-6)
        return self.score(mean)


class SmartTrim(nn.Module):
    """The trimmers of one model (``tokens[str(layer)]``, ``heads[str(layer)]``), registered on it as
    ``_vtr_adaptive``; ``flops`` is the cost target of :func:`vtr.adaptive.flops_loss`."""

    name = "smarttrim"

    def __init__(self, width: int, num_layers: int, num_heads: int, num_protected: int, mlp_macs: float,
                 attn_dim: int, flops: float = 0.5, tau: float = 1.0, noise: float = 1.0, start: float = 3.0):
        super().__init__()
        for option, value, allowed, ok in (("flops", flops, "a number in (0, 1] (the cost target)", 0 < flops <= 1),
                                           ("tau", tau, "a finite number > 0 (Gumbel-sigmoid temperature)", tau > 0),
                                           ("noise", noise, "a finite number >= 0 (the Gumbel noise's scale)",
                                            noise >= 0),
                                           ("start", start, "a finite number > 0 (every trimmer's first keep logit: "
                                            "the untrained model keeps everything)", start > 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
                raise ValueError(f"smarttrim: {option} must be {allowed}, got {value!r}")
        self.flops, self.tau, self.noise = float(flops), float(tau), float(noise)
        self.num_protected, self.num_heads = num_protected, num_heads
        self.width, self.mlp_macs, self.attn_dim = width, float(mlp_macs), attn_dim
        self.tokens = nn.ModuleDict({str(i): TokenTrimmer(width, start) for i in range(num_layers)})
        self.heads = nn.ModuleDict({str(i): HeadTrimmer(width, num_heads, start) for i in range(num_layers)})

    def hard(self, logit: Tensor) -> Tensor:
        """Training decision: 0/1 forward, straight-through Gumbel-sigmoid gradient."""
        logit = logit.float()
        if self.noise:
            uniform = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            logit = logit + self.noise * (uniform.log() - (-uniform).log1p())
        soft = (logit / self.tau).sigmoid()
        return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())

    def spent(self, tokens: Tensor, heads: Tensor, num_tokens: int) -> Tensor:
        """``[B]`` a block's cost relative to the untrimmed block, from the fractions of its ``num_tokens`` tokens
        and of the heads kept: projections scale with tokens x heads, the MLP with tokens, the attention with
        tokens^2 x heads."""
        n, c, a = float(num_tokens), float(self.width), float(self.attn_dim)
        full = n * (4 * c * a + self.mlp_macs) + 2 * n * n * a
        kept = tokens * n
        return (kept * (4 * c * a * heads + self.mlp_macs) + 2 * kept * kept * a * heads) / full

    def extra_repr(self) -> str:
        return f"flops={self.flops}, tau={self.tau}, noise={self.noise}"


def pruned_attention(attn: nn.Module, x: Tensor, heads: Tensor) -> Tensor:
    """timm ``Attention`` on ``x`` with only the heads ``heads`` (``[h]`` indices): ``qkv``'s rows and ``proj``'s
    columns of the others are left out, the attention runs fused on ``h`` heads. No head: ``proj``'s bias."""
    batch, tokens, _ = x.shape
    d, h = attn.head_dim, heads.numel()
    if h == 0:
        bias = attn.proj.bias
        return x.new_zeros(batch, tokens, attn.proj.out_features) + (0 if bias is None else bias)
    within = torch.arange(d, device=x.device)
    columns = (heads[:, None] * d + within).flatten()                                     # [h * d]
    rows = torch.cat([part * attn.attn_dim + columns for part in range(3)])              # q, k, v rows
    bias = None if attn.qkv.bias is None else attn.qkv.bias[rows]
    qkv = F.linear(x, attn.qkv.weight[rows], bias).reshape(batch, tokens, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v)
    out = out.transpose(1, 2).reshape(batch, tokens, h * d)
    return F.linear(out, attn.proj.weight[:, columns], attn.proj.bias)


def masked_attention(attn: nn.Module, x: Tensor, heads: Tensor, key_bias: Tensor) -> Tensor:
    """timm ``Attention`` with each head's output multiplied by ``heads`` ``[B, H]`` (training) and keys biased."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v, attn_mask=key_bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out * heads[:, :, None, None].to(out.dtype)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim)))


class TrimmingViT(Swapped):
    """Mixed in before the model's class: each call of ``forward_features`` opens the tokens kept so far."""

    def forward_features(self, *args, **kwargs):
        with calls.kept_tokens(self.__dict__["_vtr_adaptive_ref"]):
            return super().forward_features(*args, **kwargs)


class TrimmingBlock(Swapped):
    """Mixed in before timm's ``Block``: token and head trimming before its attention."""

    _vtr_layer: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        trim: SmartTrim = self.__dict__["_vtr_adaptive_ref"]
        if calls.complete(trim):
            return super().forward(x, attn_mask=attn_mask)
        if attn_mask is not None or is_causal:
            raise ValueError("smarttrim prunes tokens and heads per image and cannot follow an attn_mask or is_causal")
        previous = calls.current_kept(trim)
        if previous is None:   # the block called on its own, outside the model's forward: a fresh image
            previous = x.new_ones(x.shape[:2])
        layer, protected = str(self._vtr_layer), trim.num_protected
        if trim.training:
            token = trim.hard(trim.tokens[layer](x, previous))
            token = torch.cat([token.new_ones(token.shape[0], protected), token[:, protected:]], dim=1)
            kept = previous * token
            heads = trim.hard(trim.heads[layer](x, kept))
            calls.record_trim(trim, self._vtr_layer, kept, heads, trim.spent(kept.mean(1), heads.mean(1), x.shape[1]))
            calls.set_kept(trim, kept)
            bias = (MASK_FLOOR + (1 - MASK_FLOOR) * kept).log().to(x.dtype)[:, None, None, :]
            y = x + self.drop_path1(self.ls1(masked_attention(self.attn, self.norm1(x), heads, bias)))
            y = y + self.drop_path2(self.ls2(self.mlp(self.norm2(y))))
            return x + kept[..., None].to(x.dtype) * (y - x)   # a pruned token is frozen: no later block reads it
        return self._pruned(trim, layer, x, previous > 0.5)

    def _pruned(self, trim: SmartTrim, layer: str, x: Tensor, previous: Tensor) -> Tensor:
        """Inference, image by image: the kept tokens gathered, the kept heads cut out of the projections."""
        out, protected = x.clone(), trim.num_protected
        kept_all = torch.zeros_like(previous)
        heads_all = []
        for row in range(x.shape[0]):
            alive = previous[row].nonzero().squeeze(1)
            tokens = x[row:row + 1, alive]
            ones = tokens.new_ones(tokens.shape[:2])
            keep = trim.tokens[layer](tokens, ones)[0] > 0
            keep[:int((alive < protected).sum())] = True
            alive, tokens = alive[keep], tokens[:, keep]
            heads = (trim.heads[layer](tokens, tokens.new_ones(tokens.shape[:2]))[0] > 0).nonzero().squeeze(1)
            y = tokens + self.drop_path1(self.ls1(pruned_attention(self.attn, self.norm1(tokens), heads)))
            y = y + self.drop_path2(self.ls2(self.mlp(self.norm2(y))))
            out[row, alive] = y[0]
            kept_all[row, alive] = True
            heads_all.append(torch.zeros(trim.num_heads, device=x.device).index_fill(0, heads, 1.0))
        kept_heads = torch.stack(heads_all)
        calls.record_trim(trim, self._vtr_layer, kept_all, kept_heads,
                          trim.spent(kept_all.float().mean(1), kept_heads.mean(1), x.shape[1]))
        calls.set_kept(trim, kept_all.to(x.dtype))
        return out


def build(model: nn.Module, **options) -> SmartTrim:
    """SmartTrim's trimmers for a timm ViT whose attention can lose heads and whose output reads the class token
    (a pruned token stays in the sequence, frozen, where an average pool would still read it)."""
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
            raise ValueError(f"smarttrim: model.blocks[{i}].attn normalises or gates over all heads together "
                             "(scale_norm / gated): its heads cannot be cut out one by one")
    if model.attn_pool is not None or model.global_pool != "token" or not model.has_class_token:
        raise ValueError(f"smarttrim: the model must pool its class token (global_pool='token'), got "
                         f"global_pool={model.global_pool!r}: pruned tokens stay in the sequence, unchanged")
    block = model.blocks[0]
    mlp_macs = sum(m.in_features * m.out_features for m in block.mlp.modules() if isinstance(m, nn.Linear))
    return SmartTrim(model.embed_dim, len(model.blocks), block.attn.num_heads, model.num_prefix_tokens,
                     mlp_macs, block.attn.attn_dim, **options)
