"""timm VisionTransformer adapter: token reduction between each block's attention and MLP.

Patching swaps the model's class for a subclass whose ``forward_features`` opens the call's token
state and whose ``pool`` weights by token size, and each ``Block``'s class for a subclass whose
``forward`` is ``Block.forward`` with the reduction step between the attention and MLP residuals.
Blocks are still called as modules, so hooks on them fire, with the block's (reduced) tokens. Each
block's own submodules (norms, attention with qk_norm, LayerScale, drop-path, MLP) are called in
the order ``Block.forward`` calls them, so nothing the model does is skipped.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from timm.layers import Attention, AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer

from vtr.budget.cost import EncoderCost
from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.run import Run
from vtr.core.state import TokenState

from .. import steps
from ..base import Adapter, Swapped, remove_hooks, restore_class, swap_class
from ..errors import UnsupportedModelError

SUPPORTED_POOLS = ("token", "avg", "avgmax", "max", "map", "")


def _check(model: VisionTransformer) -> None:
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


def _cost(model: VisionTransformer, metric: str = "x") -> EncoderCost:
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
        width=model.embed_dim,
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


def _call_grid(patch_embed: nn.Module, image_size: tuple, embedded: Tensor) -> tuple[int, int]:
    """The patch grid of this call, from the patch embedding, never the model's default grid size.

    A dynamic-size model (``dynamic_img_size=True``) embeds to ``[B, rows, cols, C]``: the grid is that
    shape. A flattening embedding's grid follows from the image size (``dynamic_feat_size`` honours
    dynamic padding); an embedding without it only takes its own fixed size.
    """
    if embedded.dim() == 4:
        return int(embedded.shape[1]), int(embedded.shape[2])
    if hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(int(v) for v in patch_embed.dynamic_feat_size(image_size))
    return tuple(int(v) for v in patch_embed.grid_size)


def _causal(is_causal: bool) -> dict:
    """``is_causal`` only when set: timm releases before 1.0.25 do not take it."""
    return {"is_causal": True} if is_causal else {}


class ReducingBlock(Swapped):
    """Mixed in before ``Block``: its forward with the reduction step between attention and MLP (or, for
    reducers that filter a block's input, before the attention). Outside a patched forward pass the
    block computes exactly what ``Block.forward`` does."""

    _vtr_layer: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        run = runs.active()
        state = steps.entering(run, x)
        if state is None:
            return super().forward(x, attn_mask=attn_mask, **_causal(is_causal))
        layer = self._vtr_layer
        state = steps.reduce(run, state, x, layer, before_attention=True)
        x = state.x
        bias = state.attention_bias(run.reduction.prop_attn)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias)))
        q, k = run.take_qk(layer)
        state = steps.reduce(run, state, x, layer, q=q, k=k, bias=bias)
        x = state.x
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        run.advance(state.with_x(x))
        return x


class ReducingViT(Swapped):
    """Mixed in before the model's own class; see the module docstring."""

    _vtr: Reduction

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        # One run for the features and the head of this call (none when the call runs unreduced).
        with runs.opened(self._vtr, self.training):
            return super().forward(x, attn_mask=attn_mask, **_causal(is_causal))

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        with runs.opened(self._vtr, self.training) as run:
            if run is None:   # vtr.disabled, or eval mode under active="train": the unpatched model
                features = super().forward_features(x, attn_mask=attn_mask, **_causal(is_causal))
            else:
                features = self._reduced_features(run, x, attn_mask, is_causal)
        # forward_head, called on its own, pools these tokens by this call's sizes, and refuses others.
        return runs.returned(self._vtr, features)

    def _reduced_features(self, run: Run, x: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        if is_causal:
            raise ValueError("is_causal=True is not supported on a model patched by vtr")
        image_size = tuple(x.shape[-2:])
        x = self.patch_embed(x)
        grid = _call_grid(self.patch_embed, image_size, x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        state = TokenState.start(x, self.num_prefix_tokens, padding_mask=_key_padding(attn_mask, x))
        run.begin(state, len(self.blocks), steps.grid_of(grid, self.num_prefix_tokens, state.num_original))
        state = steps.run_blocks(self.blocks, run, self.grad_checkpointing)
        run.finish()
        return self.norm(state.x)

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if self.attn_pool is None and pool_type in ("token", ""):
            return super().pool(x, pool_type)   # the CLS token, or every token: no sizes involved
        size = runs.final_sizes(self._vtr, x, self.training)
        if size is None:
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        if self.attn_pool is not None:
            # A token that stands for s patches gets the attention s copies would get.
            return self.attn_pool(x[:, start:], attn_mask=size[:, start:].log().to(x.dtype)[:, None, None, :])
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


class TimmViT(Adapter):
    """timm ``VisionTransformer`` (ViT, DeiT, DeiT-III, DINOv2, registers, SigLIP-style heads)."""

    name = "timm"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def check(self, model: VisionTransformer) -> None:
        _check(model)

    def cost(self, model: VisionTransformer, metric: str = "x") -> EncoderCost:
        return _cost(model, metric)

    def blocks(self, model: VisionTransformer) -> nn.Module:
        return model.blocks

    def input_size(self, model: VisionTransformer) -> tuple[int, int, int]:
        return (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)

    def patch(self, model: VisionTransformer, reduction: Reduction) -> None:
        for layer, block in enumerate(model.blocks):
            if reduction.needs_qk:
                block.attn.q_norm.register_forward_hook(runs.KeepQK(layer, "q"))
                block.attn.k_norm.register_forward_hook(runs.KeepQK(layer, "k"))
            block._vtr_layer = layer
            swap_class(block, ReducingBlock)
        model._vtr = reduction
        swap_class(model, ReducingViT)

    def unpatch(self, model: VisionTransformer) -> None:
        remove_hooks(model, runs.KeepQK)
        for block in model.blocks:
            restore_class(block)
            del block._vtr_layer
        restore_class(model)
        del model._vtr
