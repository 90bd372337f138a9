"""Draw what a patched model did to an image: merged groups and kept or dropped patches.

Each patch is painted with the mean colour of the group of patches that ended in the same final
token (so a merged region reads as one flat colour), group boundaries are drawn in white, and
patches that were dropped are shown in dim grey. Everything comes from ``vtr.report(model)`` of
one forward pass: ``assignment`` (final token per original token, -1 dropped), ``grid`` and
``num_protected``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..adapters import family, find_adapter
from ..api import report

SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ImageLike = Union[str, Path, np.ndarray, Image.Image]


def load_image(image: ImageLike, size: tuple[int, int]) -> np.ndarray:
    """``[H, W, 3]`` uint8 at ``size`` = (H, W): a scikit-image sample name, a file path or an array."""
    if isinstance(image, str) and image in SAMPLE_IMAGES:
        from skimage import data  # ships the sample photos: no download
        pixels = getattr(data, image)()
    elif isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ValueError(f"image must be a file or one of {SAMPLE_IMAGES}, got {str(image)!r}")
        pixels = np.asarray(Image.open(image).convert("RGB"))
    elif isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB"))
    else:
        pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {pixels.shape}")
    picture = Image.fromarray(pixels[..., :3].astype(np.uint8))
    return np.asarray(picture.resize((size[1], size[0]), Image.BICUBIC))


def input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model takes by default, from its adapter."""
    if family(model) is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass size=(H, W)")
    return tuple(find_adapter(model).input_size(model)[1:])


def _normalization(model: nn.Module) -> tuple:
    config = getattr(model, "pretrained_cfg", None) or {}
    mean = config.get("mean") or getattr(model, "image_mean", None) or IMAGENET_MEAN
    std = config.get("std") or getattr(model, "image_std", None) or IMAGENET_STD
    return mean, std


def to_input(pixels: np.ndarray, model: nn.Module) -> torch.Tensor:
    """``[1, 3, H, W]`` float tensor normalised with the model's mean and std."""
    mean, std = _normalization(model)
    x = torch.from_numpy(pixels.copy()).float().div(255).permute(2, 0, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x[None]


def group_map(model: nn.Module, row: int = 0) -> np.ndarray:
    """``[rows, cols]`` index of the final token each patch went to (-1 dropped), from the report."""
    last = report(model)
    if last.grid is None:
        raise ValueError("the report has no patch grid (the input was not a full image grid)")
    rows, cols = last.grid
    patches = last.assignment[row, last.num_protected:]
    if patches.numel() != rows * cols:
        raise ValueError(f"the report's grid {last.grid} does not match its {patches.numel()} patch tokens")
    return patches.reshape(rows, cols).cpu().numpy()


def render(pixels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Paint each group with its mean colour, white boundaries between groups, dropped in grey."""
    height, width = pixels.shape[:2]
    rows, cols = groups.shape
    if height % rows or width % cols:
        raise ValueError(f"image {height}x{width} is not a whole number of {rows}x{cols} patches")
    labels = groups.repeat(height // rows, axis=0).repeat(width // cols, axis=1)
    flat = labels.ravel()
    colours = pixels.reshape(-1, 3).astype(np.float64)
    kept = flat >= 0
    out = np.empty_like(colours)
    if kept.any():
        ids, inverse = np.unique(flat[kept], return_inverse=True)
        sums = np.zeros((len(ids), 3))
        np.add.at(sums, inverse, colours[kept])
        counts = np.bincount(inverse, minlength=len(ids))[:, None]
        out[kept] = (sums / counts)[inverse]
    grey = colours[~kept].mean(axis=1, keepdims=True)
    out[~kept] = 40 + 0.3 * grey  # dropped: dim grey, the image still faintly visible
    out = out.reshape(height, width, 3)
    edge = np.zeros((height, width), dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    out[edge] = 255
    return out.round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def visualize(model: nn.Module, image: ImageLike = "astronaut", path: Optional[Union[str, Path]] = None,
              *, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Run the patched ``model`` on ``image`` and draw its merged groups / kept tokens.

    ``image``: a scikit-image sample (``"astronaut"``, ``"chelsea"``, ``"coffee"``, ``"rocket"``), a
    file path or an ``[H, W, 3]`` array; it is resized to the model's input size. Returns the
    ``[H, W, 3]`` uint8 drawing and writes it as a PNG to ``path`` when given.
    """
    size = size or input_size(model)
    pixels = load_image(image, size)
    param = next(model.parameters())
    model(to_input(pixels, model).to(device=param.device, dtype=param.dtype))
    drawing = render(pixels, group_map(model))
    if path is not None:
        Image.fromarray(drawing).save(path, format="PNG")
    return drawing
