"""TokenPacker (Li et al., arXiv 2407.02392): a coarse-to-fine visual projector that packs ``s x s`` patches into one
token.

Coarse: the point queries are the feature layer's patch grid downsampled by the scale factor ``s`` (bilinear, as the
paper: at ``s = 2`` that is each 2 x 2 window's mean, at ``s = 3`` each 3 x 3 window's centre). Fine: each point query
attends (region-to-point injection) only to the ``s x s`` high-resolution tokens of its own region, whose keys and
values come from several vision layers at once (multi-level: the layers' features side by side). The attended result,
not a residual of the query, goes through a two-layer MLP to the language model's width, as in the authors' code.

The module takes what LLaVA's ``get_image_features`` hands its projector when ``vision_feature_layer`` is a list:
the listed layers concatenated on the channel axis. vtr lists the multi-level layers first and the query's layer
last (see :mod:`vtr.compression.llava`), so one ``forward(features)`` is a drop-in ``multi_modal_projector``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cells(grid: tuple[int, int], scale: int) -> tuple[int, int]:
    """The point-query grid: ``ceil(grid / scale)`` (a grid that ``scale`` does not divide gets smaller regions at
    its bottom and right edges, as ``pool`` does: 8 x 8 at scale 3 -> 3 x 3 regions of 3, 3 and 2 rows)."""
    return -(-grid[0] // scale), -(-grid[1] // scale)


def regions(x: Tensor, grid: tuple[int, int], scale: int) -> tuple[Tensor, Tensor]:
    """``[B, N, C]`` tokens of a row-major ``grid`` as ``[B, M, s*s, C]``: for each of the ``M`` cells of the
    :func:`cells` grid (row-major), its ``s x s`` tokens (row-major within the cell), zero past the grid's edge;
    and ``[M, s*s]`` which of them are real."""
    b, n, c = x.shape
    rows, cols = grid
    if rows * cols != n:
        raise ValueError(f"regions: {n} tokens do not form a {rows} x {cols} grid")
    r, k = cells(grid, scale)
    padded = x.new_zeros(b, r * scale, k * scale, c)
    padded[:, :rows, :cols] = x.view(b, rows, cols, c)
    real = torch.zeros(r * scale, k * scale, dtype=torch.bool, device=x.device)
    real[:rows, :cols] = True
    out = padded.view(b, r, scale, k, scale, c).permute(0, 1, 3, 2, 4, 5).reshape(b, r * k, scale * scale, c)
    mask = real.view(r, scale, k, scale).permute(0, 2, 1, 3).reshape(r * k, scale * scale)
    return out, mask


def point_queries(x: Tensor, grid: tuple[int, int], scale: int) -> Tensor:
    """The low-resolution point queries: ``[B, N, C]`` on ``grid`` bilinearly resized to the :func:`cells` grid,
    ``[B, M, C]`` row-major (computed in float32 as the authors do, returned in ``x``'s dtype)."""
    b, n, c = x.shape
    image = x.float().view(b, grid[0], grid[1], c).permute(0, 3, 1, 2)
    small = F.interpolate(image, size=cells(grid, scale), mode="bilinear", align_corners=False)
    return small.permute(0, 2, 3, 1).reshape(b, -1, c).to(x.dtype)


def dot_product_attention(query: Tensor, key: Tensor, value: Tensor, real: Tensor) -> Tensor:
    """One head of scaled dot-product attention, ``[R, 1, C]`` queries over the ``real`` (``[R, K]``) of
    ``[R, K, C]`` keys."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=real[:, None, :])


def region_to_point(query: Tensor, key: Tensor, value: Tensor, grid: tuple[int, int], scale: int,
                    attend: Optional[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = None) -> Tensor:
    """Region-to-point injection: point query ``m`` (``[B, M, C]``) attends to the keys/values (``[B, N, C]`` on
    ``grid``) of its own ``scale x scale`` region only. ``attend(q [R, 1, C], k [R, s*s, C], v, real [R, s*s])
    -> [R, 1, C']`` (``real``: the keys inside the grid; default: one head of scaled dot-product attention).
    Returns ``[B, M, C']``."""
    b, m, c = query.shape
    (keys, real), (values, _) = regions(key, grid, scale), regions(value, grid, scale)
    if keys.shape[1] != m:
        raise ValueError(f"region_to_point: {m} point queries for {keys.shape[1]} regions")
    flat = lambda t: t.reshape(b * m, scale * scale, t.shape[-1])   # noqa: E731  one region per attention row
    out = (attend or dot_product_attention)(query.reshape(b * m, 1, c), flat(keys), flat(values),
                                            real.repeat(b, 1))
    return out.reshape(b, m, out.shape[-1])


def _mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out))


def _heads(width: int) -> int:
    """The authors' head width is 128; a narrow (tiny) projector keeps heads of at least 16 channels."""
    for head_width in (128, 64, 32, 16, 8):
        if width % head_width == 0 and width // head_width >= 1:
            return width // head_width
    return 1


class TokenPacker(nn.Module):
    """The TokenPacker projector: ``[B, N, (levels + 1) * vision_width]`` -> ``[B, N / scale**2, hidden_size]``.

    vision_width: the vision tower's width. levels: how many vision layers the keys/values read (their features
    come first in the input, the point queries' layer last). hidden_size: the language model's width. grid: the
    patch grid ``(rows, cols)``. scale: 2 packs 2 x 2 patches (1/4 of the tokens), 3 packs 3 x 3 (1/9); one that
    does not divide the grid leaves smaller regions at its edges. width: the attention's width (default the vision
    width); heads: its heads.
    """

    def __init__(self, vision_width: int, levels: int, hidden_size: int, grid: tuple[int, int], scale: int = 2,
                 width: Optional[int] = None, heads: Optional[int] = None):
        super().__init__()
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 2:
            raise ValueError(f"tokenpacker: scale must be an integer >= 2 (2 keeps 1/4 of the tokens, 3 keeps 1/9), "
                             f"got {scale!r}")
        rows, cols = grid
        if scale > min(rows, cols):
            raise ValueError(f"tokenpacker: scale must be at most the patch grid's side ({rows} x {cols}), got {scale}")
        if levels < 1:
            raise ValueError(f"tokenpacker: levels must be at least 1, got {levels}")
        for name, value in (("width", width), ("heads", heads)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"tokenpacker: {name} must be a positive integer (or None for the default), "
                                 f"got {value!r}")
        width = vision_width if width is None else width
        heads = _heads(width) if heads is None else heads
        if width % heads:
            raise ValueError(f"tokenpacker: heads must divide the attention's width {width}, got {heads}")
        self.vision_width, self.levels, self.grid, self.scale = vision_width, levels, (rows, cols), scale
        self.q_proj = nn.Linear(vision_width, width, bias=False)
        self.k_proj = _mlp(levels * vision_width, width, width)
        self.v_proj = _mlp(levels * vision_width, width, width)
        self.ln_q, self.ln_k, self.ln_v = (nn.LayerNorm(width, eps=1e-6) for _ in range(3))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = _mlp(width, hidden_size, hidden_size)
        self.apply(_init)

    @property
    def num_tokens(self) -> int:
        """Tokens out per image."""
        rows, cols = cells(self.grid, self.scale)
        return rows * cols

    def forward(self, features: Tensor) -> Tensor:
        expected = (self.levels + 1) * self.vision_width
        if features.shape[-1] != expected or features.shape[-2] != self.grid[0] * self.grid[1]:
            raise ValueError(f"tokenpacker expects [B, {self.grid[0] * self.grid[1]}, {expected}] features "
                             f"({self.levels} levels and the query layer, width {self.vision_width}), got "
                             f"{tuple(features.shape)}")
        multi, single = features[..., :-self.vision_width], features[..., -self.vision_width:]
        query = self.ln_q(self.q_proj(point_queries(single, self.grid, self.scale)))
        key, value = self.ln_k(self.k_proj(multi)), self.ln_v(self.v_proj(multi))
        def attend(q: Tensor, k: Tensor, v: Tensor, real: Tensor) -> Tensor:
            return self.attention(q, k, v, key_padding_mask=~real, need_weights=False)[0]

        return self.mlp(region_to_point(query, key, value, self.grid, self.scale, attend))


def _init(module: nn.Module) -> None:
    """The authors' initialisation: truncated normal (std 0.02) linear weights, zero biases, unit layer norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def grid_of(num_tokens: int) -> tuple[int, int]:
    """The square grid of ``num_tokens`` patch tokens; a clear error when they form none."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} visual tokens form no square patch grid (the CLS token among them? use "
                         "vision_feature_select_strategy='default')")
    return side, side
