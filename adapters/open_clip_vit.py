"""open_clip adapter: the ViT image tower of an open_clip model (the whole CLIP model or ``.visual``).

Patching swaps the tower's class for a subclass whose ``forward`` runs the blocks on a
:class:`~vtr.state.TokenState`, with the reduction step between each block's attention residual and
its MLP residual, and whose ``_pool`` weights by token size. The model's other parts (text tower,
``encode_text``, ``logit_scale``) are untouched; ``encode_image`` reaches the patched tower.

Both of open_clip's block kinds are supported:

- ``ResidualAttentionBlock`` (the default) attends with ``nn.MultiheadAttention``. Layers that need
  nothing from vtr call the module itself, so its fused eval fast path
  (``aten._native_multi_head_attention``) stays in use. A layer whose attention needs the
  proportional-attention mask (after a reduction), or whose reducer needs q/k, runs the same
  weights through ``F.scaled_dot_product_attention`` with the ``[B, 1, 1, N]`` float mask, the
  computation MHA's own slow path does (MHA would refuse a broadcast mask and fall back to a
  materialised ``[B*H, N, N]`` one). Hooks registered on such a layer's ``attn`` do not fire.
- ``CustomResidualAttentionBlock`` (qk_norm, head scale, inner norms) attends with open_clip's own
  ``Attention``, which takes the float mask as it is; q/k come from hooks on its ``ln_q``/``ln_k``.
  Scaled cosine attention crashes in open_clip 3.3 itself (``torch.bmm`` on 4-D tensors) and is
  refused.

Pooling: CLS token (``'tok'``), size-weighted mean (``'avg'``), all tokens (``'none'``, fewer when
reduced) and the attentional poolers (CoCa-style, ``'parallel'``, ``'cascade'``), whose keys get
``log(size)`` so a merged token gets the attention of the tokens it stands for.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from open_clip.transformer import (AttentionalPooler, Attention, CustomResidualAttentionBlock,
                                   ResidualAttentionBlock, TextTransformer, VisionTransformer)

from vtr.config import Reduction
from vtr.cost import EncoderCost
from vtr.signals import QKCapture
from vtr.state import TokenState

from . import steps
from .errors import UnsupportedModelError

name = "open_clip"


def matches(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("open_clip.") for cls in type(model).__mro__)


def tower(model: nn.Module) -> nn.Module:
    """The image tower: ``model.visual`` for a CLIP/CoCa model, the model itself otherwise."""
    return model.visual if isinstance(getattr(model, "visual", None), nn.Module) else model


def check(model: nn.Module) -> None:
    """Refuse anything whose forward we would not reproduce exactly."""
    kind = type(model).__name__
    visual = tower(model)
    where = f"{kind}.visual" if visual is not model else kind
    if isinstance(visual, TextTransformer):
        raise UnsupportedModelError(f"{where} is open_clip's text tower; vtr reduces image tokens: pass the CLIP "
                                    "model or its .visual")
    if not isinstance(visual, VisionTransformer):
        hint = ""
        if isinstance(getattr(visual, "trunk", None), nn.Module):
            hint = "; it wraps a timm model in .trunk, which the timm adapter patches: vtr.patch(tower.trunk, ...)"
        raise UnsupportedModelError(
            f"{where} is {type(visual).__module__}.{type(visual).__name__}; vtr's open_clip adapter supports ViT "
            f"image towers (open_clip.transformer.VisionTransformer) only{hint}")
    if getattr(visual, "_vtr", None) is not None:
        raise UnsupportedModelError(f"{where} is already patched by vtr; call vtr.unpatch on it first")
    if not visual.transformer.batch_first:
        raise UnsupportedModelError(f"{where}.transformer runs sequence-first (batch_first=False); not supported")
    for i, block in enumerate(visual.transformer.resblocks):
        at = f"{where}.transformer.resblocks[{i}]"
        if type(block) is ResidualAttentionBlock:
            attn = block.attn
            if (hasattr(block, "ln_1_kv") or not attn.batch_first or not attn._qkv_same_embed_dim
                    or attn.bias_k is not None or attn.add_zero_attn):
                raise UnsupportedModelError(f"{at}.attn is a MultiheadAttention vtr does not reproduce (cross "
                                            "attention, bias_k/v, add_zero_attn or separate q/k/v widths)")
        elif type(block) is CustomResidualAttentionBlock:
            if type(block.attn) is not Attention:
                raise UnsupportedModelError(f"{at}.attn is {type(block.attn).__name__}; supported: "
                                            "open_clip.transformer.Attention")
            if block.attn.logit_scale is not None:
                raise UnsupportedModelError(
                    f"{at}.attn uses scaled cosine attention, which fails in open_clip itself (torch.bmm on "
                    "4-D tensors); vtr supports the custom block with qk_norm, scale_heads and inner norms")
        else:
            raise UnsupportedModelError(f"{at} is {type(block).__name__}; supported: ResidualAttentionBlock, "
                                        "CustomResidualAttentionBlock")


def cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    visual = tower(model)
    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    num_patches = visual.grid_size[0] * visual.grid_size[1]
    conv = visual.conv1
    fixed = float(num_patches * width * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
    per_final_token = 0.0
    proj_rows = 1.0
    pools = [p for p in (visual.attn_pool, getattr(visual, "attn_pool_contrastive", None)) if p is not None]
    for i, pool in enumerate(pools):
        queries, dim = pool.query.shape
        context = pool.attn.kdim
        on_tokens = i == 0 or visual.attn_pool_type == "parallel"
        keys = 0 if on_tokens else visual.attn_pool.query.shape[0]
        fixed += 2 * queries * dim * dim + keys * (2 * dim * dim + 2 * queries * dim)  # q, out proj
        if on_tokens:
            per_final_token += 2 * context * dim + 2 * queries * dim                  # k, v proj; attention
    if visual.attn_pool is not None and visual.attn_pool_contrastive is None and visual.pool_type == "none":
        proj_rows = visual.attn_pool.query.shape[0]
    if visual.proj is not None:
        proj_macs = float(visual.proj.shape[0] * visual.proj.shape[1])
        if visual.attn_pool is None and visual.pool_type == "none":
            per_final_token += proj_macs
        else:
            fixed += proj_rows * proj_macs
    attn = blocks[0].attn
    return EncoderCost(
        num_tokens=num_patches + 1,
        num_protected=1,
        num_layers=len(blocks),
        attn_linear=4.0 * width * width,   # in_proj (q, k, v) and out_proj, both block kinds
        attn_dim=width,
        mlp_linear=steps.linear_macs(blocks[0].mlp),
        fixed=fixed,
        per_final_token=per_final_token,
        metric_dim=width // attn.num_heads if metric == "keys" else width,
        grid=tuple(int(g) for g in visual.grid_size),
    )


def _mha_attention(attn: nn.MultiheadAttention, h: Tensor, bias: Optional[Tensor]):
    """``nn.MultiheadAttention`` self-attention as its slow path computes it, taking a broadcast
    ``[B, 1, 1, N]`` float mask; also returns q and k ``[B, H, N, D]`` for the reducer."""
    batch, num_tokens, width = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, num_tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, num_tokens, width)), q, k


def _block_forward(block: nn.Module, state: TokenState, reduction: Reduction, layer: int, num_layers: int,
                   capture: Optional[QKCapture], grid, query, query_projection) -> TokenState:
    """The block's forward with the reduction step between its attention and MLP residuals."""
    projection = dict(query=query, query_projection=query_projection)
    state = steps.reduce(reduction, state, state.x, layer, num_layers, before_attention=True, grid=grid,
                         **projection)
    x = state.x
    bias = state.attention_bias(reduction.prop_attn)
    q = k = None
    if isinstance(block, CustomResidualAttentionBlock):
        x = x + block.ls_1(block.ln_attn(block.attn(block.ln_1(x), attn_mask=bias)))
        if capture is not None:
            q, k = capture.q, capture.k
            capture.clear()
        scale = block.attn.scale
    else:
        reducing = steps.num_kept(reduction, state, layer) < state.num_tokens
        if bias is None and not (reducing and steps.needs_qk(reduction)):
            attended = block.attention(q_x=block.ln_1(x))   # the module itself: fused fast path
        else:
            attended, q, k = _mha_attention(block.attn, block.ln_1(x), bias)
        x = x + block.ls_1(attended)
        scale = None
    state = steps.reduce(reduction, state, x, layer, num_layers, q=q, k=k, bias=bias, scale=scale, grid=grid,
                         **projection)
    x = state.x
    return state.with_x(x + block.ls_2(block.mlp(block.ln_2(x))))


def _attend(pool: AttentionalPooler, x: Tensor, bias: Tensor) -> Tensor:
    """``AttentionalPooler.forward`` with ``log(size)`` added to its keys' logits."""
    x = pool.ln_k(x)
    q = pool.ln_q(pool.query)
    return pool.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x, x, need_weights=False, key_padding_mask=bias)[0]


class ReducingVisionTransformer:
    """Mixed in before the tower's own class; see the module docstring."""

    _vtr: Reduction

    def embedding_width(self) -> Optional[int]:
        """Width of the image embedding a token maps to, or None (attentional poolers)."""
        if self.attn_pool is not None:
            return None
        return self.proj.shape[1] if self.proj is not None else self.ln_post.normalized_shape[0]

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """Each token as the image embedding it would give as the pooled token: ``ln_post``, ``proj``."""
        tokens = self.ln_post(tokens)
        return tokens @ self.proj if self.proj is not None else tokens

    def forward(self, x: Tensor):
        reduction = self._vtr
        x = self._embeds(x)
        state = TokenState.start(x, num_protected=1)
        query = steps.batch_query(reduction, x.shape[0], self.embedding_width(), type(self).__name__)
        grid = steps.grid_of(self.grid_size, 1, state.num_original)
        tokens = [state.num_tokens]
        blocks = self.transformer.resblocks
        for layer, block in enumerate(blocks):
            capture = reduction.captures[layer] if reduction.captures else None
            state = steps.checkpointed(_block_forward, block, state, reduction, layer, len(blocks), capture, grid,
                                       query, self.project_tokens if query is not None else None,
                                       enabled=self.transformer.grad_checkpointing)
            tokens.append(state.num_tokens)
        steps.record(reduction, state, tokens, grid)
        pooled, tokens = self._pool(state.x)
        if self.proj is not None:
            pooled = pooled @ self.proj
        if self.output_tokens:
            return pooled, tokens
        return pooled

    def _pool(self, x: Tensor):
        state = self._vtr.final_state
        if state is None or x.shape[:2] != state.x.shape[:2]:
            raise RuntimeError("a vtr-patched tower pools the tokens of its own forward pass; call the tower")
        if not state.is_reduced and not state.padded:
            return super()._pool(x)
        bias = steps.key_bias(state.size, x.dtype)
        if self.attn_pool is not None:
            if self.attn_pool_contrastive is not None:
                x = self.ln_post(x)
                tokens = _attend(self.attn_pool, x, bias)
                if self.attn_pool_type == "parallel":
                    pooled = _attend(self.attn_pool_contrastive, x, bias)
                else:
                    pooled = self.attn_pool_contrastive(tokens)
                return pooled, tokens
            x = self.ln_post(_attend(self.attn_pool, x, bias))
            return self._global_pool(x)   # over the pooler's queries, which are not reduced
        if self.final_ln_after_pool:
            pooled, tokens = self._weighted_pool(x, state.size)
            return self.ln_post(pooled), tokens
        return self._weighted_pool(self.ln_post(x), state.size)

    def _weighted_pool(self, x: Tensor, size: Tensor):
        if self.pool_type != "avg":
            return self._global_pool(x)
        weight = size[:, 1:, None].to(x.dtype)
        return (x[:, 1:] * weight).sum(1) / weight.sum(1), x[:, 1:]

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            "forward_intermediates on a vtr-patched tower would run unreduced; call vtr.unpatch(model) first, "
            "or read vtr.report(model) after a forward pass")


_PATCHED_CLASSES: dict[type, type] = {}


def patch(model: nn.Module, reduction: Reduction) -> None:
    visual = tower(model)
    cls = type(visual)
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Vtr{cls.__name__}", (ReducingVisionTransformer, cls), {})
    reduction.original_class = cls
    blocks = visual.transformer.resblocks
    if steps.needs_qk(reduction) and any(isinstance(b, CustomResidualAttentionBlock) for b in blocks):
        reduction.captures = [QKCapture() if isinstance(b, CustomResidualAttentionBlock) else None for b in blocks]
        for block, capture in zip(blocks, reduction.captures):
            if capture is not None:
                reduction.hooks += capture.attach(block.attn.ln_q, block.attn.ln_k)
    visual._vtr = reduction
    model._vtr = reduction
    visual.__class__ = _PATCHED_CLASSES[cls]


def unpatch(model: nn.Module) -> None:
    visual = tower(model)
    reduction: Reduction = model._vtr
    for handle in reduction.hooks:
        handle.remove()
    visual.__class__ = reduction.original_class
    del visual._vtr
    if visual is not model:
        del model._vtr
