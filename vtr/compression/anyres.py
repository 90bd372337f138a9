"""LLaVA-NeXT's AnyRes packing at any crop side, for compressions that hand the language model fewer tokens per crop.

transformers' ``LlavaNextModel.pack_image_features`` lays each image out as its base image's (the thumbnail's)
tokens, then the crops' grids stitched into one feature map, unpadded to the image's aspect ratio, with the learned
``image_newline`` after each row of that map. It reads the crops' side from the config (``image_size //
patch_size``), so a projector that packs each crop's ``s x s`` patches into one token (TokenPacker) breaks it: the
map is ``s`` times smaller. :func:`pack` is the same rule with the side read from the features (transformers' own
``get_anyres_image_grid_shape`` and ``unpad_image``, applied to the smaller map), and :class:`PackingLlavaNext` puts
it in the inner model's place while a compression is attached. At the full side it is transformers' packing exactly
(a test holds it to that).

Adaptive granularity pools every part (the thumbnail and each crop) at the level its router picks, then packs the
pooled grids the same way (:func:`pooled`), as AVG-LLaVA does on LLaVA-NeXT; inside :func:`unpacked` the inner
model hands the parts over unpacked for that.

The prompt keeps the processor's placeholder count per image (:func:`image_tokens` at the full side); the compressed
model compacts it to the packed count, as on LLaVA-1.5.
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

from vtr.adapters.base import Swapped


def crop_grid(config, image_size) -> tuple[int, int]:
    """(rows, cols) of crops AnyRes cuts an image of ``image_size`` (height, width) into."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, config.vision_config.image_size)


def pack(config, features: Tensor, image_size, newline: Optional[Tensor]) -> Tensor:
    """One image's ``[parts, side * side, D]`` features (base image first, then the crops row-major) packed as
    transformers packs them: ``[base tokens + unpadded map with a newline per row, D]``."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    parts, n, d = features.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"LLaVA-NeXT packing: {n} tokens per crop form no square grid")
    if parts == 1:
        base = features[0]
        return base if newline is None else torch.cat([base, newline[None].to(base)])
    rows, cols = crop_grid(config, image_size)
    if parts - 1 != rows * cols:
        raise ValueError(f"an image of size {tuple(int(v) for v in image_size)} is cut into {rows} x {cols} crops, "
                         f"got {parts - 1}: image_sizes must match pixel_values")
    grid = features[1:].view(rows, cols, side, side, d).permute(4, 0, 2, 1, 3).reshape(d, rows * side, cols * side)
    grid = unpad_image(grid, image_size)
    if newline is not None:
        grid = torch.cat([grid, newline[:, None, None].expand(d, grid.shape[1], 1).to(grid)], -1)
    return torch.cat([features[0], grid.flatten(1, 2).transpose(0, 1)])


def image_tokens(config, image_size, side: int) -> int:
    """Tokens an image of ``image_size`` packs to with crops of ``side x side`` tokens (newlines included)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    parts = image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    return len(pack(config, torch.zeros(parts, side * side, 1), image_size, torch.zeros(1)))


def pooled(config, parts: Tensor, grid: tuple[int, int], factor: int, image_size, newline: Tensor) -> Tensor:
    """One image's ``[parts, rows * cols, D]`` projected features, each part ``factor x factor`` average-pooled on
    its ``grid`` (smaller windows at the edges where ``factor`` does not divide it), then :func:`pack`-ed."""
    from .granularity import pool_level

    return pack(config, torch.stack([pool_level(part, grid, factor) for part in parts]), image_size, newline)


_UNPACKED: contextvars.ContextVar[bool] = contextvars.ContextVar("vtr_anyres_unpacked", default=False)


@contextmanager
def unpacked() -> Iterator[None]:
    """Inside, a compressed LLaVA-NeXT's ``get_image_features`` returns each image's parts unpacked
    (``[parts, side * side, D]``), for a compression that packs them itself."""
    token = _UNPACKED.set(True)
    try:
        yield
    finally:
        _UNPACKED.reset(token)


class PackingLlavaNext(Swapped):
    """Mixed in front of ``LlavaNextModel`` while a compression is attached: packs at the side the projector gave
    (inside :func:`unpacked`: not at all)."""

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        if _UNPACKED.get():
            features = list(image_features)
            lengths = torch.tensor([f.shape[0] * f.shape[1] for f in features], dtype=torch.long)
            return features, lengths
        packed = [pack(self.config, f, size, image_newline) for f, size in zip(image_features, image_sizes)]
        lengths = torch.tensor([len(p) for p in packed], dtype=torch.long, device=image_features[0].device)
        return packed, lengths
