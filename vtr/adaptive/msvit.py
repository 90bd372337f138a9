"""MSViT (Havtorn et al., "MSViT: Dynamic Mixed-Scale Tokenization for Vision Transformers", ICCV-W 2023,
arXiv 2307.02321): a light **gate** looks at each coarse region (``coarse`` x ``coarse`` fine patches, 2 x 2 by
default) and picks one coarse token for it or its fine tokens, so the token count follows the image's content.

What is the paper's and what is chosen here:

- Gate: a 4-layer MLP per coarse region (the paper's size), hidden width ``hidden`` (the model's width by
  default). Its input is chosen here: the region's fine patch embeddings concatenated (the backbone's own
  trained linear map of the region's pixels, already computed for the fine tokens), so the gate sees the
  fine detail it must judge. Output: the probability that the region needs its fine tokens.
- Coarse token: the paper's rule, the coarse region downscaled (mean of each ``coarse`` x ``coarse`` pixel
  block) and embedded by the **same** patch embedding. Its position embedding is the **mean** of its fine
  tokens' position embeddings (the paper interpolates linearly; the mean is bilinear interpolation at the
  region's centre when ``coarse=2``).
- A coarse token has **size** ``coarse ** 2`` (4): with ``proportional=True`` (the default, chosen here for a
  backbone trained on fine tokens only) every attention adds ``log(size)`` to its key, so a coarse token weighs
  as the tokens it replaces (vtr's proportional attention; ToMe's rule).
- Training: hard decisions in the forward pass with a straight-through Gumbel-sigmoid gradient (``noise``
  scales the logistic noise, ``tau`` the temperature); every coarse and fine token is computed and the ones
  not chosen are masked as keys (weight 1e-6, as vtr's other training-time masks); the task loss reaches the
  gate through those key weights, linear in the choice (not through the embeddings: see ``_masked``).
  :func:`batch_shaping` (the paper's loss, Bejnordi et al. 2020) pulls the distribution of the gate's
  probabilities in the batch to a Beta(``rate``, 1 - ``rate``) prior, whose mean is ``rate``, the target share
  of fine regions.
- ``batch_rate=True`` (not the paper's; default False): in training the ``rate`` share of the batch's regions with
  the highest gate logits are fine, whatever the gate's scale, so the backbone learns from coarse tokens at the
  target share while the gate learns the ranking. Measured why: on the fidelity ViTs the batch-shaping loss did
  not hold the share in a 1-epoch run (the gates went all fine or all coarse; ``benchmarks/RESULTS-finetune.md``).
  Move ``threshold`` to the share at inference (``benchmarks/adaptive.py msvit --fine-shares``).
- Inference: a region is fine when its probability is above ``threshold`` (0.5). Each row's tokens are the
  chosen ones in raster order (a coarse token at its region's first fine slot), padded to the batch's largest
  count with ``-inf`` keys, so a row computes the same alone or in a batch. With every region fine, the model is
  the unpatched model bit for bit.

Supported: timm ``VisionTransformer`` with class-token pooling (``global_pool="token"``), a fixed image size,
and a fine patch grid divisible by ``coarse``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from scipy import special, stats
from torch import Tensor, nn
from torch.nn import functional as F

from ..adapters.base import Swapped
from . import calls

MASK_FLOOR = 1e-6
PDF_CLIP = (1e-3, 100.0)   # the released batch-shaping code clips the prior's density (its gradient) to this range


class BetaCDF(torch.autograd.Function):
    """The Beta(a, b) CDF of ``x``, computed in float64 by scipy; its gradient is the density clipped to
    ``PDF_CLIP`` (as the released code: the density is infinite at 0 and 1 for a, b < 1)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: float, b: float) -> Tensor:
        values = x.detach().to("cpu", torch.float64).numpy()
        density = np.clip(stats.beta.pdf(values, a, b), *PDF_CLIP)
        ctx.save_for_backward(torch.from_numpy(density).to(x.device, x.dtype))
        return torch.from_numpy(special.betainc(a, b, values)).to(x.device, x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (density,) = ctx.saved_tensors
        return grad * density, None, None


def batch_shaping(probabilities: Tensor, rate: float) -> Tensor:
    """The batch-shaping loss (Bejnordi et al., ICLR 2020; MSViT's gate loss): the Cramér-von Mises distance
    between the empirical CDF of the gate's probabilities in the batch (every image and region, flattened) and the
    CDF of a Beta(``rate``, 1 - ``rate``) prior: ``mean_i (i / (N + 1) - F(x_(i))) ** 2`` over the sorted
    ``x_(1) <= ... <= x_(N)``. The prior is bimodal (mass near 0 and 1) with mean ``rate``: it asks for confident
    gates, a ``rate`` share of them near 1, per batch rather than per image, so images may differ."""
    if not 0 < rate < 1:
        raise ValueError(f"batch_shaping: rate must be in (0, 1) (the Beta prior's mean), got {rate!r}")
    x = probabilities.flatten().sort().values
    count = x.numel()
    if count == 0:
        raise ValueError("batch_shaping needs at least one gate probability")
    empirical = torch.arange(1, count + 1, device=x.device, dtype=x.dtype) / (count + 1)
    return ((empirical - BetaCDF.apply(x, float(rate), float(1 - rate))) ** 2).mean()


def _number(name: str, value, low: float, high: float, *, low_open: bool = True, high_open: bool = True) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"msvit: {name} must be a number in {span}, got {value!r}")
    return float(value)


class Gate(nn.Module):
    """MSViT's gate: a 4-layer MLP from a region's concatenated fine embeddings (layer-normed) to its fine logit."""

    def __init__(self, inputs: int, hidden: int, rate: float):
        super().__init__()
        # LayerNorm first: the raw patch embeddings are large. It did not stop the logits from running away in
        # 1-epoch runs on the fidelity ViTs (benchmarks/RESULTS-finetune.md, MSViT): bounding them is open.
        self.score = nn.Sequential(nn.LayerNorm(inputs), nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.constant_(self.score[-1].bias, math.log(rate / (1 - rate)))   # starts near the target share

    def forward(self, regions: Tensor) -> Tensor:
        return self.score(regions).squeeze(-1)


class MixedScale(nn.Module):
    """MSViT's modules for one model (its gate), registered on it as ``_vtr_adaptive``."""

    name = "msvit"

    def __init__(self, width: int, grid: tuple[int, int], num_prefix: int, coarse: int = 2, rate: float = 0.5,
                 hidden: Optional[int] = None, threshold: float = 0.5, proportional: bool = True,
                 tau: float = 1.0, noise: float = 1.0, batch_rate: bool = False):
        super().__init__()
        if isinstance(coarse, bool) or not isinstance(coarse, int) or coarse < 2:
            raise ValueError(f"msvit: coarse must be an int >= 2 (fine patches per side of a coarse region), "
                             f"got {coarse!r}")
        if grid[0] % coarse or grid[1] % coarse:
            raise ValueError(f"msvit: coarse={coarse} must divide the model's patch grid {grid[0]}x{grid[1]}")
        hidden = width if hidden is None else hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"msvit: hidden must be an int >= 1 (the gate's width), got {hidden!r}")
        if not isinstance(proportional, bool):
            raise ValueError(f"msvit: proportional must be True or False, got {proportional!r}")
        if not isinstance(batch_rate, bool):
            raise ValueError(f"msvit: batch_rate must be True or False, got {batch_rate!r}")
        self.batch_rate = batch_rate
        self.rate = _number("rate", rate, 0, 1)
        self.threshold = _number("threshold", threshold, 0, 1)   # kept as its logit, ``cut``
        self.tau = _number("tau", tau, 0, math.inf)
        self.noise = _number("noise", noise, 0, math.inf, low_open=False)
        self.coarse, self.grid, self.num_prefix, self.proportional = coarse, grid, num_prefix, proportional
        self.gate = Gate(coarse * coarse * width, hidden, self.rate)
        rows, cols = grid
        index = torch.arange(rows * cols)
        region = (index // cols // coarse) * (cols // coarse) + (index % cols) // coarse
        first = (index // cols) % coarse == 0
        first &= (index % cols) % coarse == 0
        self.register_buffer("region", region, persistent=False)   # each fine slot's region
        self.register_buffer("first", first, persistent=False)     # the slot a coarse token takes

    @property
    def threshold(self) -> float:
        """The gate probability above which a region is fine (its logit ``cut`` is what is compared, so a cut
        beyond float64's sigmoid, as a calibration on saturated logits may give, stays exact)."""
        return 1 / (1 + math.exp(-self.cut))

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = _number("threshold", value, 0, 1)
        self.cut = math.log(value) - math.log1p(-value)

    @property
    def num_regions(self) -> int:
        return (self.grid[0] // self.coarse) * (self.grid[1] // self.coarse)

    def regions(self, fine: Tensor) -> Tensor:
        """``[B, rows*cols, C]`` fine embeddings -> ``[B, regions, coarse*coarse*C]``, region by region."""
        batch, _, width = fine.shape
        (rows, cols), k = self.grid, self.coarse
        grouped = fine.reshape(batch, rows // k, k, cols // k, k, width).permute(0, 1, 3, 2, 4, 5)
        return grouped.reshape(batch, self.num_regions, k * k * width)

    def pooled(self, values: Tensor) -> Tensor:
        """The mean of each region's fine ``values`` ``[..., rows*cols, C]`` -> ``[..., regions, C]``."""
        width = values.shape[-1]
        return self.regions(values.reshape(-1, *values.shape[-2:])).view(-1, self.num_regions, self.coarse ** 2,
                                                                          width).mean(2)

    def decide(self, logits: Tensor) -> Tensor:
        """``[B, regions]``: 1 (fine) or 0 (coarse); in training hard with a straight-through Gumbel-sigmoid
        gradient, in eval ``probability > threshold`` (bool)."""
        cut = self.cut
        if not self.training:
            return logits > cut
        if self.noise:
            uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            logits = logits + self.noise * (uniform.log() - (-uniform).log1p())
        if self.batch_rate:   # the batch's `rate` share of regions with the highest logits are fine
            cut = torch.quantile(logits.detach().flatten(), 1 - self.rate)
        soft = ((logits - cut) / self.tau).sigmoid()
        return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())

    def extra_repr(self) -> str:
        return (f"coarse={self.coarse}, rate={self.rate}, threshold={self.threshold}, "
                f"proportional={self.proportional}, tau={self.tau}, noise={self.noise}, batch_rate={self.batch_rate}")


class MixedScaleViT(Swapped):
    """Mixed in before timm's ``VisionTransformer``: mixed-scale tokens, then the blocks with the key bias."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        ms: MixedScale = self.__dict__["_vtr_adaptive_ref"]
        if calls.complete(ms):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("msvit chooses each image's tokens and cannot follow an attn_mask or is_causal")
        raw = self.patch_embed(x)                                        # [B, Nf, C], before position
        tokens = self._pos_embed(raw)                                    # exactly the unpatched model's tokens
        prefix, fine = tokens[:, :ms.num_prefix], tokens[:, ms.num_prefix:]
        logits = ms.gate(ms.regions(raw)).float()
        chosen = ms.decide(logits)
        calls.record_gate(ms, logits.sigmoid(), chosen)
        coarse = self._coarse_tokens(ms, x)                              # [B, regions, C]
        if ms.training:
            x, bias = self._masked(ms, prefix, fine, coarse, chosen)
        else:
            x, bias = self._gathered(ms, prefix, fine, coarse, chosen)
        x = self.norm_pre(self.patch_drop(x))
        for block in self.blocks:
            x = block(x, attn_mask=bias)
        return self.norm(x)

    def _coarse_tokens(self, ms: MixedScale, images: Tensor) -> Tensor:
        """The image downscaled by ``coarse`` (pixel means), embedded by the same patch embedding, plus the mean
        of each region's fine position embeddings."""
        embed = self.patch_embed
        coarse = embed.proj(F.avg_pool2d(images, ms.coarse))
        coarse = embed.norm(coarse.flatten(2).transpose(1, 2))
        if self.pos_embed is not None:
            fine_pos = self.pos_embed[:, 0 if self.no_embed_class else self.num_prefix_tokens:]
            coarse = coarse + ms.pooled(fine_pos)
        return self.pos_drop(coarse)

    @staticmethod
    def _masked(ms: MixedScale, prefix: Tensor, fine: Tensor, coarse: Tensor, chosen: Tensor):
        """Training: every token, the ones not chosen masked as keys. The choice reaches the task loss through the
        keys' weights only (linear in the straight-through choice): on the trained 6-block fidelity ViT that
        gradient's sign agreed with the loss change of flipping a region for 118 of 140 regions, where also
        scaling the embeddings by the choice (the usual straight-through use) agreed for 60 of 115, no better
        than chance (``benchmarks/msvit_gradient_check.py``)."""
        fine_chosen = chosen[:, ms.region]                               # [B, Nf]
        selected = torch.cat([chosen.new_ones(prefix.shape[:2]), fine_chosen, 1 - chosen], dim=1)
        x = torch.cat([prefix, fine, coarse], dim=1)
        bias = (MASK_FLOOR + (1 - MASK_FLOOR) * selected).log()
        if ms.proportional:
            size = torch.ones(selected.shape[1], device=x.device)
            size[-ms.num_regions:] = ms.coarse ** 2
            bias = bias + size.log()
        return x, bias.to(x.dtype)[:, None, None, :]

    @staticmethod
    def _gathered(ms: MixedScale, prefix: Tensor, fine: Tensor, coarse: Tensor, chosen: Tensor):
        """Inference: each row's chosen tokens in raster order (a coarse token in its region's first slot),
        padded to the batch's largest count with -inf keys; no bias at all when every token is fine and whole."""
        fine_chosen = chosen[:, ms.region]                               # [B, Nf] bool
        slots = torch.where(fine_chosen[..., None], fine, coarse[:, ms.region])
        keep = fine_chosen | ms.first
        keep = torch.cat([keep.new_ones(prefix.shape[:2]), keep], dim=1)
        candidates = torch.cat([prefix, slots], dim=1)
        counts = keep.sum(1)
        width = int(counts.max())
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]   # kept first, in order
        x = candidates.gather(1, order[..., None].expand(-1, -1, candidates.shape[-1]))
        valid = torch.arange(width, device=x.device) < counts[:, None]
        coarse_slot = torch.cat([keep.new_zeros(prefix.shape[:2]), ~fine_chosen], dim=1).gather(1, order)
        if bool(valid.all()) and not (ms.proportional and bool(coarse_slot.any())):
            return x, None
        bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
        if ms.proportional:
            bias = bias.masked_fill(coarse_slot, 2 * math.log(ms.coarse))
        bias = bias.masked_fill(~valid, float("-inf"))
        return x, bias[:, None, None, :]


def build(model: nn.Module, **options) -> MixedScale:
    """MSViT's gate for a timm ViT (``vtr.adaptive.patch`` checks the model first)."""
    if model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"msvit: the model pools with {model.global_pool!r}; msvit supports class-token pooling "
                         "(global_pool='token') only: the other poolings would count a coarse token once")
    if getattr(model, "dynamic_img_size", False) or not getattr(model.patch_embed, "flatten", True):
        raise ValueError("msvit: the model must have a fixed image size (dynamic_img_size=False)")
    grid = tuple(model.patch_embed.grid_size)
    return MixedScale(model.embed_dim, grid, model.num_prefix_tokens, **options)
