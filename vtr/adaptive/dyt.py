"""Dynamic Tuning (DyT; Zhao et al., "Dynamic Tuning Towards Parameter and Inference Efficiency for ViT
Adaptation", arXiv 2403.11808).

Tokens are not removed: a **token dispatcher** per block (one linear layer: a logit per token) decides
which tokens a block computes, and the others **skip** it and reach the next block unchanged. A light
**adapter** (AdaptFormer's bottleneck, parallel to the MLP) is what trains besides the dispatchers; the
backbone stays frozen. The paper's defaults, from its released image code:

- ``dispatch="mlp"``: the dispatcher reads each token after the attention residual and only the tokens
  it activates go through the MLP (the attention still sees every token). That is the paper's chosen
  variant; its FLOPs cannot fall below the attention's share (about 46% on the fidelity ViTs).
  ``dispatch="block"``: the dispatcher reads the block's input and a token it skips skips the whole block
  (attention, MLP and adapter) and comes back unchanged after it; activated tokens attend to each other
  only. This is what reaches 25% FLOPs.
- The class token (every protected leading token) is always activated.
- Training: Gumbel-sigmoid with temperature ``tau=5``, hard decisions (0 or 1) in the forward pass and a
  straight-through gradient (``noise=0`` leaves the logistic noise out: training then makes eval's decisions); a token skips by multiplying its update by 0, so it is unchanged exactly.
  The rate loss (:func:`vtr.adaptive.rate_loss`) pulls the mean activation rate to ``rate`` (0.5).
- Inference: a token is activated when its logit is above 0 (sigmoid above 0.5); the block runs on the
  activated tokens **only** (gathered, computed, scattered back), so the FLOP counter counts a skipped
  token's MLP (or block) as nothing and the time falls with it.
- Adapter: ``down (width -> bottleneck), ReLU, dropout 0.1, up (bottleneck -> width)``, scaled by 0.1,
  up-projection initialised to zero (the released "lora" init), so the patched model before training is
  the backbone with the MLP dispatch as the only change. ``bottleneck`` defaults to ``width // 12`` (64 on
  ViT-B's 768, the paper's setting). In ``"mlp"`` dispatch every token gets the adapter (the paper); in
  ``"block"`` dispatch only activated tokens do, so a skipped token is exactly unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..adapters.base import Swapped
from . import calls

DISPATCH = ("mlp", "block")
MASK_FLOOR = 1e-6   # attention weight left to a skipped key in training (as vtr's training-time masking)


class Adapter(nn.Module):
    """AdaptFormer's parallel bottleneck (DyT's adapter): ``0.1 * up(dropout(relu(down(x))))``."""

    def __init__(self, width: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        self.scale, self.dropout = scale, dropout
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)   # starts as no change: the backbone's own output
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        hidden = nn.functional.dropout(self.down(x).relu(), self.dropout, self.training)
        return self.up(hidden) * self.scale


class DynamicTuning(nn.Module):
    """DyT's modules for one model: ``dispatchers[str(layer)]`` (``Linear(width, 1)``) and
    ``adapters[str(layer)]`` for every block. Registered on the patched model as ``_vtr_adaptive``, so
    they train, save (``strict=True`` round trip) and move with it; ``vtr.unpatch`` removes them."""

    name = "dyt"

    def __init__(self, width: int, num_layers: int, num_protected: int, dispatch: str = "mlp", rate: float = 0.5,
                 bottleneck: Optional[int] = None, tau: float = 5.0, noise: float = 1.0):
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"dyt: dispatch must be one of {DISPATCH} (skip the MLP, as the paper, or the whole "
                             f"block), got {dispatch!r}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f"dyt: rate must be a number in (0, 1] (the fraction of tokens a block computes, "
                             f"which the rate loss aims at), got {rate!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"dyt: tau must be a finite number > 0 (the Gumbel-sigmoid temperature), got {tau!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"dyt: noise must be a finite number >= 0 (the scale of the Gumbel noise in training; "
                             f"1 as the paper), got {noise!r}")
        bottleneck = max(width // 12, 1) if bottleneck is None else bottleneck
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"dyt: bottleneck must be an int >= 1 (the adapter's hidden width), got {bottleneck!r}")
        self.dispatch, self.rate, self.tau, self.noise = dispatch, float(rate), float(tau), float(noise)
        self.num_protected, self.bottleneck = num_protected, bottleneck
        self.dispatchers = nn.ModuleDict({str(i): nn.Linear(width, 1) for i in range(num_layers)})
        self.adapters = nn.ModuleDict({str(i): Adapter(width, bottleneck) for i in range(num_layers)})

    def decide(self, x: Tensor, layer: int) -> Tensor:
        """``[B, N]`` activation of every token (protected ones 1): hard 0/1 with a straight-through Gumbel-
        sigmoid gradient in training, ``logit > 0`` (bool) in eval."""
        protected = self.num_protected
        logit = self.dispatchers[str(layer)](x[:, protected:]).squeeze(-1).float()
        if not self.training:
            keep = logit > 0
            return torch.cat([keep.new_ones(keep.shape[0], protected), keep], dim=1)
        if self.noise:
            uniform = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            logit = logit + self.noise * (uniform.log() - (-uniform).log1p())   # + logistic noise: Gumbel-sigmoid
        soft = (logit / self.tau).sigmoid()
        hard = (soft > 0.5).to(soft.dtype) + (soft - soft.detach())
        return torch.cat([hard.new_ones(hard.shape[0], protected), hard], dim=1)

    def extra_repr(self) -> str:
        return (f"dispatch={self.dispatch!r}, rate={self.rate}, bottleneck={self.bottleneck}, tau={self.tau}, "
                f"noise={self.noise}")


class DispatchingBlock(Swapped):
    """Mixed in before timm's ``Block``: DyT's dispatch around its sublayers. ``_vtr_adaptive_ref`` is the model's
    :class:`DynamicTuning` (a plain reference, not a submodule: its weights are the model's, under
    ``_vtr_adaptive``), ``_vtr_layer`` the block's index."""

    _vtr_layer: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        dyt: DynamicTuning = self.__dict__["_vtr_adaptive_ref"]
        if is_causal:
            raise ValueError("dyt: is_causal=True is not supported on a model patched with DyT")
        complete = calls.complete(dyt)
        if dyt.dispatch == "block" and not complete:
            if attn_mask is not None:
                raise ValueError("dyt: dispatch='block' runs each block on its activated tokens only and cannot "
                                 "follow an attn_mask; use dispatch='mlp' or no mask")
            return self._block_dispatch(dyt, x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        adapted = x + dyt.adapters[str(self._vtr_layer)](x)
        if complete:
            return adapted + self._mlp(x)
        keep = dyt.decide(x, self._vtr_layer)
        calls.record(dyt, self._vtr_layer, keep)
        if dyt.training:
            return adapted + keep[..., None].to(x.dtype) * self._mlp(x)
        flat, channels = x.reshape(-1, x.shape[-1]), x.shape[-1]
        chosen = keep.flatten().nonzero().squeeze(1)   # the MLP runs on the activated tokens only
        return adapted.reshape(-1, channels).index_add(0, chosen, self._mlp(flat[chosen])).view_as(x)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _whole(self, dyt: DynamicTuning, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The block (with the adapter beside its MLP) on ``x``, keys biased by ``bias``."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias)))
        return x + self._mlp(x) + dyt.adapters[str(self._vtr_layer)](x)

    def _block_dispatch(self, dyt: DynamicTuning, x: Tensor) -> Tensor:
        keep = dyt.decide(x, self._vtr_layer)
        calls.record(dyt, self._vtr_layer, keep)
        if dyt.training:
            # Skipped keys weigh MASK_FLOOR in the attention (never 0, so their decisions get a gradient);
            # a skipped token's update is multiplied by 0: it leaves the block exactly as it came.
            bias = (MASK_FLOOR + (1 - MASK_FLOOR) * keep).log().to(x.dtype)[:, None, None, :]
            return x + keep[..., None].to(x.dtype) * (self._whole(dyt, x, bias) - x)
        # Inference: the activated tokens of each row, in order, padded to the batch's largest count (padding
        # is a -inf key, so a row computes the same alone or in a batch); at batch 1 nothing is padded.
        counts = keep.sum(dim=1)
        width = int(counts.max())
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]   # activated first
        valid = torch.arange(width, device=x.device) < counts[:, None]
        index = order[..., None].expand(-1, -1, x.shape[-1])
        gathered = x.gather(1, index)
        bias = None
        if not bool(valid.all()):
            bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, float("-inf"))
            bias = bias[:, None, None, :]
        computed = torch.where(valid[..., None], self._whole(dyt, gathered, bias), gathered)
        return x.scatter(1, index, computed)


def build(model: nn.Module, **options) -> DynamicTuning:
    """DyT's modules for a timm ViT (``vtr.adaptive.patch`` checks the model first)."""
    return DynamicTuning(model.embed_dim, len(model.blocks), model.num_prefix_tokens, **options)
