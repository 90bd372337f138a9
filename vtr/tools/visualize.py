"""Draw what a patched model did to an image: one figure with the input, the merged groups or kept
patches, and the tokens entering each block.

Each patch is painted with the mean colour of the group of patches that ended in the same final
token (so a merged region reads as one flat colour), group boundaries are drawn in white, and
patches that were dropped are shown in dim grey. Everything comes from ``vtr.report(model)`` of
one forward pass: ``assignment`` (final token per original token, -1 dropped), ``grid``,
``num_protected`` and ``tokens``. The figure is a ``matplotlib.figure.Figure`` made outside pyplot: a
notebook shows it as the cell's value, and no backend is switched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..adapters import family, find_adapter, settings, unwrap
from ..api import report
from .plotting import new_figure

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
    model = unwrap(model)
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
              *, size: Optional[tuple[int, int]] = None, name: Optional[str] = None):
    """Run the patched ``model`` on ``image`` and draw one figure of what its reduction did: the input,
    its merged groups / kept patches, and the tokens entering each block. Returns the
    ``matplotlib.figure.Figure`` (a notebook shows it) and writes it as a PNG to ``path`` when given.

    ``image``: a scikit-image sample (``"astronaut"``, ``"chelsea"``, ``"coffee"``, ``"rocket"``), a
    file path or an ``[H, W, 3]`` array; it is resized to the model's input size. ``name`` titles the
    model (default: its architecture). :func:`render` gives the drawing alone as an array.
    """
    reduction = settings(model)
    size = size or input_size(model)
    pixels = load_image(image, size)
    param = next(model.parameters())
    model(to_input(pixels, model).to(device=param.device, dtype=param.dtype))
    last = report(model)
    groups = group_map(model)
    figure = _figure(pixels, render(pixels, groups), groups, last.tokens,
                     title=f"{name or _model_name(model)}  |  {_setting(reduction)}  |  "
                           f"{last.tokens[-1]} of {last.assignment.shape[1]} tokens kept")
    if path is not None:
        figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return figure


def _figure(pixels: np.ndarray, drawing: np.ndarray, groups: np.ndarray, tokens: list, title: str):
    """Input | groups (with a legend of what the colours mean) | tokens entering each block."""
    from matplotlib.patches import Patch

    figure = new_figure(figsize=(13, 4.6), layout="constrained")
    image_axes, result_axes, count_axes = figure.subplots(1, 3, width_ratios=[1, 1, 1.15])
    figure.suptitle(title, fontsize="large")
    image_axes.imshow(pixels)
    image_axes.set_title(f"input ({pixels.shape[1]}x{pixels.shape[0]})")
    dropped = int((groups < 0).sum())
    merged = len(np.unique(groups[groups >= 0]))
    result_axes.imshow(drawing, interpolation="nearest")
    result_axes.set_title(f"{groups.size} patches -> {merged} tokens" + (f", {dropped} dropped" if dropped else ""))
    legend = [Patch(facecolor="#b08a60", edgecolor="black", label="flat colour: patches merged into one token"),
              Patch(facecolor="white", edgecolor="black", label="white line: boundary between tokens")]
    if dropped:
        legend.append(Patch(facecolor=(0.16, 0.16, 0.16), edgecolor="black", label="dark grey: dropped patch"))
    result_axes.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize="small",
                       frameon=False)
    for axes in (image_axes, result_axes):
        axes.set_xticks([])
        axes.set_yticks([])
    blocks = np.arange(len(tokens))
    count_axes.plot(blocks, tokens, marker="o", color="tab:orange", label="with the reduction")
    count_axes.axhline(tokens[0], linestyle="--", color="grey", label="unreduced")
    count_axes.set_xticks(blocks, [str(b) for b in blocks[:-1]] + ["out"])
    count_axes.set_ylim(0, tokens[0] * 1.08)
    count_axes.set_xlabel("block (out: after the last block)")
    count_axes.set_ylabel("tokens entering the block")
    count_axes.set_title("tokens per block")
    count_axes.grid(alpha=0.3)
    count_axes.legend(loc="lower left", fontsize="small")
    return figure


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "pretrained_cfg", None) or {}
    hf_name = getattr(getattr(model, "config", None), "name_or_path", None)
    return config.get("architecture") or hf_name or type(model).__name__


def _setting(reduction) -> str:
    """``tome, flops=0.5``: the method and what it was given (a tensor option by its shape)."""
    def shown(value) -> str:
        return f"tensor{list(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)

    return ", ".join([reduction.method] + [f"{k}={shown(v)}" for k, v in reduction.arguments.items()])
