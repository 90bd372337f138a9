"""open_clip adapter: the ViT image tower of an open_clip model (the whole CLIP model or ``.visual``).

Patching swaps the tower's class for a subclass whose ``forward`` opens the call's run, starts the
token state after the embeddings and calls each resblock as a module (so hooks on resblocks fire,
with the block's reduced tokens), and whose ``_pool`` weights by token size. Each resblock's class
is swapped for a subclass whose ``forward`` is the block's own with the reduction step between its
attention residual and its MLP residual; outside a patched forward pass a resblock computes exactly
what the original does. The model's other parts (text tower, ``encode_text``, ``logit_scale``) are
untouched; ``encode_image`` reaches the patched tower.

Both of open_clip's block kinds are supported:

- ``ResidualAttentionBlock`` (the default) attends with ``nn.MultiheadAttention``. Layers that need
  nothing from vtr call the module itself, so its fused eval fast path
  (``aten._native_multi_head_attention``) stays in use. A layer whose attention needs the
  proportional-attention mask (after a reduction), or whose reducer needs q/k, runs the same
  weights through ``F.scaled_dot_product_attention`` with the ``[B, 1, 1, N]`` float mask, the
  computation MHA's own slow path does (MHA would refuse a broadcast mask and fall back to a
  materialised ``[B*H, N, N]`` one). Hooks registered on such a layer's ``attn`` do not fire.
- ``CustomResidualAttentionBlock`` (qk_norm, head scale, inner norms) attends with open_clip's own
  ``Attention``, which takes the float mask as it is; q/k reach the run through
  :class:`~vtr.core.run.KeepQK` hooks on its ``ln_q``/``ln_k``. Scaled cosine attention crashes in
  open_clip 3.3 itself (``torch.bmm`` on 4-D tensors) and is refused.

Pooling: CLS token (``'tok'``), size-weighted mean (``'avg'``), all tokens (``'none'``, fewer when
reduced) and the attentional poolers (CoCa-style, ``'parallel'``, ``'cascade'``), whose keys get
``log(size)`` so a merged token gets the attention of the tokens it stands for.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn
from open_clip.transformer import (AttentionalPooler, Attention, CustomResidualAttentionBlock,
                                   ResidualAttentionBlock, TextTransformer, VisionTransformer)

from vtr.budget.cost import EncoderCost
from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.run import Run
from vtr.core.state import TokenState

from .. import steps
from ..base import Adapter, Swapped, is_patched, remove_hooks, restore_class, swap_class
from ..errors import UnsupportedModelError


def _tower(model: nn.Module) -> nn.Module:
    """The image tower: ``model.visual`` for a CLIP/CoCa model, the model itself otherwise."""
    return model.visual if isinstance(getattr(model, "visual", None), nn.Module) else model


def _check(model: nn.Module) -> None:
    """Refuse anything whose forward we would not reproduce exactly."""
    kind = type(model).__name__
    visual = _tower(model)
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
    if is_patched(visual) or isinstance(visual, Swapped):
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


def _cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    visual = _tower(model)
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
        width=width,
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


def _reduced_forward(block: nn.Module, run: Run, state: TokenState, layer: int) -> Tensor:
    """The block's forward on ``state`` with the reduction step between its attention and MLP residuals;
    leaves the state after the block in the run."""
    reduction = run.reduction
    state = steps.reduce(run, state, state.x, layer, before_attention=True)
    x = state.x
    bias = state.attention_bias(reduction.prop_attn)
    q = k = scale = None
    if isinstance(block, CustomResidualAttentionBlock):
        x = x + block.ls_1(block.ln_attn(block.attn(block.ln_1(x), attn_mask=bias)))
        q, k = run.take_qk(layer)   # always: it also forgets them
        scale = block.attn.scale
    else:
        reducing = (not reduction.reducer.acts_before_blocks
                    and steps.num_kept(reduction, state, layer) < state.num_tokens)
        if bias is None and not (reducing and reduction.needs_qk):
            attended = block.attention(q_x=block.ln_1(x))   # the module itself: fused fast path
        else:
            attended, q, k = _mha_attention(block.attn, block.ln_1(x), bias)
        x = x + block.ls_1(attended)
    state = steps.reduce(run, state, x, layer, q=q, k=k, bias=bias, scale=scale)
    x = state.x
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    run.advance(state.with_x(x))
    return x


class ReducingResidualBlock(Swapped):
    """Mixed in before ``ResidualAttentionBlock``; see the module docstring."""

    _vtr_layer: int

    def forward(self, q_x: Tensor, k_x: Optional[Tensor] = None, v_x: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        run = runs.active()
        state = steps.entering(run, q_x)
        if state is None:
            return super().forward(q_x, k_x, v_x, attn_mask=attn_mask)
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("a vtr-patched resblock attends over its own (reduced) tokens; it takes no k_x, v_x "
                             "or attn_mask in a patched forward pass")
        return _reduced_forward(self, run, state, self._vtr_layer)


class ReducingCustomBlock(Swapped):
    """Mixed in before ``CustomResidualAttentionBlock``; see the module docstring."""

    _vtr_layer: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        run = runs.active()
        state = steps.entering(run, x)
        if state is None:
            return super().forward(x, attn_mask=attn_mask)
        if attn_mask is not None:
            raise ValueError("a vtr-patched resblock attends over its own (reduced) tokens; it takes no attn_mask "
                             "in a patched forward pass")
        return _reduced_forward(self, run, state, self._vtr_layer)


def _attend(pool: AttentionalPooler, x: Tensor, bias: Tensor) -> Tensor:
    """``AttentionalPooler.forward`` with ``log(size)`` added to its keys' logits."""
    x = pool.ln_k(x)
    q = pool.ln_q(pool.query)
    return pool.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x, x, need_weights=False, key_padding_mask=bias)[0]


class ReducingVisionTransformer(Swapped):
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
        with runs.opened(self._vtr, self.training) as run:
            if run is None:   # vtr.disabled, or eval mode under active="train": the unpatched tower
                return super().forward(x)
            grid = steps.conv_grid(self.conv1, *x.shape[-2:])   # this call's patches, not the default grid_size
            x = self._embeds(x)
            state = TokenState.start(x, num_protected=1)
            steps.condition(run, x.shape[0], self.embedding_width(), type(self)._vtr_original.__name__,
                            self.project_tokens)
            blocks = self.transformer.resblocks
            run.begin(state, len(blocks), steps.grid_of(grid, 1, state.num_original))
            state = steps.run_blocks(blocks, run, checkpointing=self.transformer.grad_checkpointing)
            run.finish()
            pooled, tokens = self._pool(state.x)
        if self.proj is not None:
            pooled = pooled @ self.proj
        if self.output_tokens:
            return pooled, tokens
        return pooled

    def _pool(self, x: Tensor):
        size = runs.final_sizes(self._vtr, x, self.training)
        if size is None:
            return super()._pool(x)
        bias = steps.key_bias(size, x.dtype)
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
            pooled, tokens = self._weighted_pool(x, size)
            return self.ln_post(pooled), tokens
        return self._weighted_pool(self.ln_post(x), size)

    def _weighted_pool(self, x: Tensor, size: Tensor):
        if self.pool_type != "avg":
            return self._global_pool(x)
        weight = size[:, 1:, None].to(x.dtype)
        return (x[:, 1:] * weight).sum(1) / weight.sum(1), x[:, 1:]

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            "forward_intermediates on a vtr-patched tower would run unreduced; call vtr.unpatch(model) first, "
            "or read vtr.report(model) after a forward pass")


class OpenClipViT(Adapter):
    """open_clip ViT image towers: a CLIP/CoCa model (its ``.visual`` is patched) or the tower itself."""

    name = "open_clip"

    def matches(self, model: nn.Module) -> bool:
        return any(cls.__module__.startswith("open_clip.") for cls in type(model).__mro__)

    def check(self, model: nn.Module) -> None:
        _check(model)

    def cost(self, model: nn.Module, metric: str = "x") -> EncoderCost:
        return _cost(model, metric)

    def blocks(self, model: nn.Module) -> nn.Module:
        return _tower(model).transformer.resblocks

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        visual = _tower(model)
        return (visual.conv1.in_channels, *(int(s) for s in visual.image_size))

    def patch(self, model: nn.Module, reduction: Reduction) -> None:
        visual = _tower(model)
        for layer, block in enumerate(visual.transformer.resblocks):
            custom = isinstance(block, CustomResidualAttentionBlock)
            if custom and reduction.needs_qk:
                block.attn.ln_q.register_forward_hook(runs.KeepQK(layer, "q"))
                block.attn.ln_k.register_forward_hook(runs.KeepQK(layer, "k"))
            block._vtr_layer = layer
            swap_class(block, ReducingCustomBlock if custom else ReducingResidualBlock)
        visual._vtr = reduction
        model._vtr = reduction    # the same object: the api reads the model's, the tower opens runs with its own
        swap_class(visual, ReducingVisionTransformer)

    def unpatch(self, model: nn.Module) -> None:
        visual = _tower(model)
        remove_hooks(visual, runs.KeepQK)
        for block in visual.transformer.resblocks:
            restore_class(block)
            del block._vtr_layer
        restore_class(visual)
        del visual._vtr
        if visual is not model:
            del model._vtr
