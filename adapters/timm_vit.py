"""timm VisionTransformer adapter: token reduction between each block's attention and MLP.

Patching swaps the model's class for a subclass whose ``forward_features`` runs the blocks on a
:class:`~vtr.state.TokenState` and whose ``pool`` weights by token size. Blocks and weights are
untouched: each block's own submodules (norms, attention with qk_norm, LayerScale, drop-path,
MLP) are called in the order ``Block.forward`` calls them, so nothing the model does is skipped.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from timm.layers import Attention, AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer, global_pool_nlc

from vtr.config import Reduction
from vtr.cost import EncoderCost
from vtr.signals import QKCapture
from vtr.state import TokenState

from . import steps
from .errors import UnsupportedModelError

name = "timm"
SUPPORTED_POOLS = ("token", "avg", "avgmax", "max", "map", "")


def matches(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def check(model: VisionTransformer) -> None:
    """Refuse anything whose forward we would not reproduce exactly."""
    kind = type(model).__name__
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise UnsupportedModelError(
                f"{kind}.blocks[{i}] is {type(block).__name__}; vtr's timm adapter supports "
                "timm.models.vision_transformer.Block (pre-norm, optional LayerScale/qk_norm) only"
            )
        if type(block.attn) is not Attention:
            raise UnsupportedModelError(
                f"{kind}.blocks[{i}].attn is {type(block.attn).__name__}; supported: timm.layers.Attention"
            )
    if model.attn_pool is not None and not isinstance(model.attn_pool, AttentionPoolLatent):
        raise UnsupportedModelError(
            f"{kind} pools with {type(model.attn_pool).__name__}; supported heads: "
            f"{', '.join(repr(p) for p in SUPPORTED_POOLS)}"
        )
    if model.attn_pool is None and model.global_pool not in SUPPORTED_POOLS:
        raise UnsupportedModelError(f"{kind} global_pool={model.global_pool!r} is not supported")


def cost(model: VisionTransformer, metric: str = "x") -> EncoderCost:
    block = model.blocks[0]
    num_patches = model.patch_embed.num_patches
    conv = model.patch_embed.proj
    fixed = float(num_patches * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
    fixed += steps.linear_macs(model.head) + steps.linear_macs(getattr(model, "head_dist", nn.Identity()))
    per_final_token = 0.0
    pool = model.attn_pool
    if pool is not None:
        latent = pool.latent_len
        fixed += latent * (steps.linear_macs(pool.q) + steps.linear_macs(pool.proj) + steps.linear_macs(pool.mlp or nn.Identity()))
        per_final_token = steps.linear_macs(pool.kv) + 2 * latent * pool.q.out_features
    return EncoderCost(
        num_tokens=num_patches + model.num_prefix_tokens,
        num_protected=model.num_prefix_tokens,
        num_layers=len(model.blocks),
        attn_linear=steps.linear_macs(block.attn),
        attn_dim=block.attn.attn_dim,
        mlp_linear=steps.linear_macs(block.mlp),
        fixed=fixed,
        per_final_token=per_final_token,
        metric_dim=block.attn.head_dim if metric == "keys" else model.embed_dim,
        has_cls=bool(model.has_class_token),
        grid=tuple(model.patch_embed.grid_size),
    )


def _key_padding(attn_mask: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A key-padding ``attn_mask`` ([B, N] or [B, 1, 1, N], bool keep-mask or additive float) as a
    [B, N] bool mask of real tokens. Other masks cannot follow tokens through merges."""
    if attn_mask is None:
        return None
    batch, num_tokens = x.shape[:2]
    mask = attn_mask
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.shape != (batch, num_tokens):
        raise ValueError(
            f"attn_mask: with token reduction vtr accepts key-padding masks of shape [B, N] or [B, 1, 1, N] "
            f"= {(batch, num_tokens)}, got {tuple(attn_mask.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask > float("-inf")


def _block_forward(block: Block, state: TokenState, reduction: Reduction, layer: int, num_layers: int,
                   capture: Optional[QKCapture], grid: Optional[tuple[int, int]]) -> TokenState:
    """``Block.forward`` with the reduction step between the attention and MLP residuals (or, for
    reducers that filter a block's input, before the attention)."""
    common = dict(grid=grid, query=reduction.query)
    state = steps.reduce(reduction, state, state.x, layer, num_layers, before_attention=True, **common)
    x = state.x
    bias = state.attention_bias(reduction.prop_attn)
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=bias)))
    q, k = (capture.q, capture.k) if capture is not None else (None, None)
    state = steps.reduce(reduction, state, x, layer, num_layers, q=q, k=k, bias=bias, **common)
    if capture is not None:
        capture.clear()
    x = state.x
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return state.with_x(x)


class ReducingViT:
    """Mixed in before the model's own class; see the module docstring."""

    _vtr: Reduction

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise ValueError("is_causal=True is not supported on a model patched by vtr")
        reduction = self._vtr
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        state = TokenState.start(x, self.num_prefix_tokens, padding_mask=_key_padding(attn_mask, x))
        grid = steps.grid_of(self.patch_embed.grid_size, self.num_prefix_tokens, state.num_original)
        tokens = [state.num_tokens]
        for layer, block in enumerate(self.blocks):
            capture = reduction.captures[layer] if reduction.captures else None
            state = steps.checkpointed(_block_forward, block, state, reduction, layer, len(self.blocks), capture,
                                       grid, enabled=self.grad_checkpointing)
            tokens.append(state.num_tokens)
        steps.record(reduction, state, tokens, grid)
        return self.norm(state.x)

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        state = self._vtr.final_state
        if state is None or x.shape[:2] != state.x.shape[:2]:
            raise RuntimeError("a vtr-patched model pools the tokens of its own last forward_features call; "
                               "call forward_features first (model(x) does)")
        if not state.is_reduced and not state.padded:
            return super().pool(x, pool_type)
        size, start = state.size, 0 if self.pool_include_prefix else self.num_prefix_tokens
        if self.attn_pool is not None:
            # A token that stands for s patches gets the attention s copies would get.
            return self.attn_pool(x[:, start:], attn_mask=size[:, start:].log().to(x.dtype)[:, None, None, :])
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type in ("token", ""):
            return global_pool_nlc(x, pool_type=pool_type)
        x, weight = x[:, start:], size[:, start:, None].to(x.dtype)
        mean = (x * weight).sum(1) / weight.sum(1)
        if pool_type == "avg":
            return mean
        peak = x.masked_fill(weight == 0, float("-inf")).amax(dim=1)
        return peak if pool_type == "max" else 0.5 * (peak + mean)

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            "forward_intermediates on a vtr-patched model would run unreduced; call vtr.unpatch(model) "
            "first, or read vtr.report(model) after a forward pass"
        )


_PATCHED_CLASSES: dict[type, type] = {}


def patch(model: VisionTransformer, reduction: Reduction) -> None:
    cls = type(model)
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Vtr{cls.__name__}", (ReducingViT, cls), {})
    reduction.original_class = cls
    if steps.needs_qk(reduction):
        reduction.captures = [QKCapture() for _ in model.blocks]
        for block, capture in zip(model.blocks, reduction.captures):
            reduction.hooks += capture.attach(block.attn.q_norm, block.attn.k_norm)
    model._vtr = reduction
    model.__class__ = _PATCHED_CLASSES[cls]


def unpatch(model: VisionTransformer) -> None:
    reduction: Reduction = model._vtr
    for handle in reduction.hooks:
        handle.remove()
    model.__class__ = reduction.original_class
    del model._vtr
