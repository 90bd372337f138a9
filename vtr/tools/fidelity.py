"""Fidelity benchmark: what reducing tokens costs in accuracy, on a model trained here.

No pretrained weights can be downloaded here, so the default task is procedural and built so that
token reduction is tested honestly: an 8x8-pixel glyph (the label; one of 8 shapes, random colour)
sits at a random place on clutter (dots and dashes of the same colours), so only the 2-9 patches
under the glyph carry the label and a reducer that merges or drops them loses it. A small timm
ViT is trained on it once on CPU (minutes) and cached in a user cache dir (``$VTR_CACHE``, else
``$XDG_CACHE_HOME/vtr`` or ``~/.cache/vtr``), never in the repository.

:func:`evaluate` then measures, for every registered method at each FLOPs target, top-1 accuracy,
top-1 agreement with the unreduced model and the cosine of their outputs, with the FLOPs fraction
*measured* by the counter in :mod:`vtr.tools.profile`. It takes any patchable model and any iterable of
``(images, labels)`` batches, so a real checkpoint and an ImageFolder go through the same code.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import api
from ..adapters import UnsupportedModelError
from ..reducers.base import REDUCERS
from .profile import MetaDeviceError, default_input, profile_model

TARGETS = (0.7, 0.5, 0.35)
MEAN, STD = 0.5, 0.25  # the task's pixel normalisation


# --- the procedural task ---------------------------------------------------------------------

def _glyphs() -> np.ndarray:
    """Eight 8x8 binary shapes; distinct in shape only (colour is random)."""
    g = np.zeros((8, 8, 8), dtype=bool)
    g[0, 1:7, 1:7] = True                                    # filled square
    g[1, 1:7, 1:7] = True
    g[1, 2:6, 2:6] = False                                   # hollow square
    g[2, 3:5, :] = True
    g[2, :, 3:5] = True                                      # plus
    idx = np.arange(8)
    g[3, idx, idx] = g[3, idx, 7 - idx] = True
    g[3, idx[:-1], idx[1:]] = g[3, idx[1:], 7 - idx[1:]] = True  # X, 2 px thick
    g[4, 0:2] = g[4, 3:5] = g[4, 6:8] = True                 # horizontal stripes
    g[5, :, 0:2] = g[5, :, 3:5] = g[5, :, 6:8] = True        # vertical stripes
    g[6] = np.tril(np.ones((8, 8), dtype=bool))              # triangle
    yy, xx = np.mgrid[0:8, 0:8] - 3.5
    radius = np.sqrt(yy ** 2 + xx ** 2)
    g[7] = (radius > 2.0) & (radius < 3.9)                   # ring
    return g


@dataclass(frozen=True)
class Task:
    """The procedural classification task (what the cached checkpoint was trained on)."""

    image_size: int = 32
    patch_size: int = 4
    clutter: int = 24           # dots and dashes of random colour on the background
    num_classes: int = 8

    def __post_init__(self):
        if self.image_size % self.patch_size or self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 and a multiple of patch_size={self.patch_size}, "
                             f"got {self.image_size}")
        if not 2 <= self.num_classes <= 8:
            raise ValueError(f"num_classes must be in [2, 8] (there are 8 glyphs), got {self.num_classes}")


def make_images(task: Task, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` images ``[count, 3, S, S]`` (normalised to mean 0, std ~1) and their labels."""
    rng = np.random.default_rng(seed)
    size, glyphs = task.image_size, _glyphs()
    labels = rng.integers(0, task.num_classes, count)
    # Background: a smooth random colour gradient plus pixel noise.
    ramp = np.linspace(0, 1, size)
    corner = rng.uniform(0.1, 0.5, (count, 2, 3))
    images = corner[:, 0, None, None, :] * (1 - ramp[None, :, None, None]) + corner[:, 1, None, None, :] * ramp[None, :, None, None]
    images = np.broadcast_to(images, (count, size, size, 3)).copy()
    images += rng.normal(0, 0.04, images.shape)
    for i in range(count):
        for _ in range(task.clutter):  # dots 2x2, dashes 1x4 or 4x1, colours like the glyph's
            h, w = ((2, 2), (1, 4), (4, 1))[rng.integers(3)]
            y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            images[i, y:y + h, x:x + w] = rng.uniform(0.3, 1.0, 3)
        y, x = rng.integers(0, size - 8 + 1, 2)
        mask = glyphs[labels[i]]
        if rng.random() < 0.5:
            mask = mask[:, ::-1]  # mirror: the triangle comes in two orientations
        images[i, y:y + 8, x:x + 8][mask] = rng.uniform(0.5, 1.0, 3)
    images = (images.clip(0, 1) - MEAN) / STD
    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32)), torch.from_numpy(labels)


def batches(images: Tensor, labels: Tensor, batch_size: int) -> list:
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size)]


# --- the model trained on it -------------------------------------------------------------------

@dataclass(frozen=True)
class Training:
    """Model size and training recipe; part of the cache key with :class:`Task`."""

    embed_dim: int = 48
    depth: int = 12            # as ViT-S/B: the depth the papers' layer choices (EViT's 4, 7, 10) are made for
    num_heads: int = 3
    train_images: int = 8000
    epochs: int = 6            # ~8 min on one free CPU core; 92-93% top-1 on held-out images
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


# `vtr fidelity --quick` and CI: a smaller task (4 glyphs, less clutter) and model that still learn
# (84-94% top-1 over training seeds 0-5, chance 25%) in about a minute on one CPU core, so a method that
# collapses shows. A training run is not bit-reproducible across CPUs, so the recipe was chosen to learn
# for every seed tried: 3,000 images for 6 epochs at lr 3e-3 stalled near 69% for some.
QUICK_TASK = Task(clutter=12, num_classes=4)
QUICK_TRAINING = Training(embed_dim=32, depth=4, num_heads=2, train_images=4000, epochs=8, lr=1.5e-3)

# `vtr fidelity --second`: a second trained ViT on which the methods' defaults must hold too (issue 21), unlike the
# default one in depth (6 blocks, not 12), patch size (8 px, not 4: a glyph spans 1-4 tokens, not 4-9) and task
# (48 px images with more clutter: 36 patch tokens, not 64).
SECOND_TASK = Task(image_size=48, patch_size=8, clutter=40, num_classes=8)
SECOND_TRAINING = Training(embed_dim=64, depth=6, num_heads=4, train_images=12000, epochs=16, lr=2e-3)


def build_model(task: Task, training: Training) -> nn.Module:
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=task.image_size, patch_size=task.patch_size,
        embed_dim=training.embed_dim, depth=training.depth, num_heads=training.num_heads,
        num_classes=task.num_classes, global_pool="token",
    )
    # The task's normalisation, so tools that read it (vtr.visualize) feed the model right.
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (MEAN,) * 3, "std": (STD,) * 3}
    return model


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of ``total`` steps, then a cosine decay to zero (the task models' schedule)."""
    warmup = max(1, total // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s / total, 1.0))))


def train(task: Task, training: Training, log=print, threads: int = 1) -> nn.Module:
    """Train the task's ViT from scratch on CPU (AdamW, cosine schedule, label smoothing).

    One thread and eager attention by default: on a small shared CPU that was 6x faster per step
    than two threads with the fused SDPA kernel (whose CPU backward is slow at this size).
    """
    torch.manual_seed(training.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = build_model(task, training)
    for block in model.blocks:
        block.attn.fused_attn = False
    images, labels = make_images(task, training.train_images, seed=training.seed + 1)
    steps_per_epoch = -(-len(images) // training.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, steps_per_epoch * training.epochs)
    generator = torch.Generator().manual_seed(training.seed)
    model.train()
    start = time.time()
    for epoch in range(training.epochs):
        order = torch.randperm(len(images), generator=generator)
        correct = 0
        for step in range(steps_per_epoch):
            index = order[step * training.batch_size:(step + 1) * training.batch_size]
            x, y = images[index], labels[index]
            flip = torch.rand(len(x), generator=generator) < 0.5  # vertical flips keep every label
            x = torch.where(flip[:, None, None, None], x.flip(2), x)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == y).sum())
        log(f"epoch {epoch + 1}/{training.epochs}: train top-1 {correct / len(images):.3f} "
            f"({time.time() - start:.0f}s)")
    for block in model.blocks:
        block.attn.fused_attn = True
    torch.set_num_threads(previous_threads)
    return model.eval()


def cache_dir() -> Path:
    root = os.environ.get("VTR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vtr"
    return Path(root)


def keyed_checkpoint(prefix: str, key: dict, root: Optional[Path] = None) -> Path:
    """``<root>/<prefix>-<digest>.pt``: a trained model's cache file, named by a digest of everything that made it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root or cache_dir()) / f"{prefix}-{digest}.pt"


def trained_once(path: Path, build: Callable[[], nn.Module], train: Callable[[], nn.Module], *, retrain: bool = False,
                 log=print, what: str = "the model") -> nn.Module:
    """The model cached at ``path`` (``build()`` then its saved weights), else ``train()``'s, saved there first (a
    temporary file renamed into place: never a half-written checkpoint). Every trained yardstick goes through it."""
    if path.is_file() and not retrain:
        model = build()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    log(f"training {what} once (cached at {path})")
    model = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return model


def checkpoint_path(task: Task, training: Training, root: Optional[Path] = None) -> Path:
    return keyed_checkpoint("fidelity-vit", {"task": asdict(task), "training": asdict(training), "version": 1}, root)


def trained_model(task: Task = Task(), training: Training = Training(), *, root: Optional[Path] = None,
                  retrain: bool = False, log=print) -> nn.Module:
    """The task's ViT, trained once and then loaded from the cache."""
    return trained_once(checkpoint_path(task, training, root), lambda: build_model(task, training),
                        lambda: train(task, training, log=log), retrain=retrain, log=log, what="the fidelity ViT")


# --- the evaluation ----------------------------------------------------------------------------

@dataclass
class Result:
    """One method at one FLOPs target. ``status`` is "ok" or why there is no measurement."""

    method: str
    target: float
    status: str = "ok"
    flops: Optional[float] = None        # measured fraction of the unreduced MACs
    top1: Optional[float] = None
    agreement: Optional[float] = None    # top-1 equal to the unreduced model's
    cosine: Optional[float] = None       # cosine of the outputs with the unreduced model's
    tokens: list = field(default_factory=list)  # tokens entering each block, then the final count


@torch.no_grad()
def _outputs(model: nn.Module, data: Sequence) -> Tensor:
    return torch.cat([model(x) for x, _ in data])


def _measured_flops(model: nn.Module, data: Sequence, base: float) -> float:
    try:
        macs = profile_model(model).macs  # meta device: shapes only
    except MetaDeviceError:  # data-dependent reducer: average over real images
        macs = profile_model(model, [x for x, _ in data[:2]]).macs
    return macs / base


def evaluate(model: nn.Module, data: Iterable, *, methods: Optional[Sequence[str]] = None,
             targets: Sequence[float] = TARGETS, options: Optional[dict] = None, log=print) -> list[Result]:
    """Top-1, agreement and output cosine vs measured FLOPs for each method at each target.

    ``data``: ``(images, labels)`` batches on the model's device. ``methods`` default: every training-free
    registered method (a learned one, ``dynamicvit``/``sit``, is measured untrained only when named: its
    score before training says nothing about the method).
    ``options``: per-method keyword arguments (``{"random": {"seed": 1}}``). A method that cannot
    reach a target, or cannot run on this model, gets a row saying why.
    """
    if api.is_patched(model):
        raise ValueError("evaluate a model that is not patched; it patches and unpatches each method")
    data = list(data)
    labels = torch.cat([y for _, y in data])
    reference = _outputs(model, data)
    base = profile_model(model, default_input(model, device=_device(model))).macs
    results = [Result("none", 1.0, flops=1.0, top1=_top1(reference, labels), agreement=1.0, cosine=1.0,
                      tokens=_unreduced_tokens(model))]
    methods = [m for m in (methods or training_free_methods()) if m != "none"]
    for method in methods:
        for target in targets:
            result = Result(method, float(target))
            try:
                api.patch(model, method, flops=float(target), **(options or {}).get(method, {}))
            except (ValueError, TypeError, UnsupportedModelError) as error:
                result.status = _reason(error)
                results.append(result)
                log(f"{method:>10} @ {target:.0%}: {result.status}")
                continue
            try:
                outputs = _outputs(model, data)
                result.tokens = list(api.report(model).tokens)
                result.flops = _measured_flops(model, data, base)
            except Exception as error:  # a method that needs what this model cannot give (a query, ...)
                result.status = _reason(error)
                results.append(result)
                log(f"{method:>10} @ {target:.0%}: {result.status}")
                continue
            finally:
                api.unpatch(model)
            result.top1 = _top1(outputs, labels)
            result.agreement = float((outputs.argmax(1) == reference.argmax(1)).float().mean())
            result.cosine = float(F.cosine_similarity(outputs.float(), reference.float(), dim=1).mean())
            results.append(result)
            log(f"{method:>10} @ {target:.0%}: top-1 {result.top1:.3f}, agreement {result.agreement:.3f}, "
                f"cosine {result.cosine:.4f}, FLOPs {result.flops:.3f}")
    return results


def training_free_methods() -> list[str]:
    """The methods this ViT task measures by default: training-free ones that act inside a vision tower."""
    return [name for name in api.methods() if not REDUCERS[name].learned and "tower" in REDUCERS[name].stages]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _unreduced_tokens(model: nn.Module) -> list:
    from ..adapters import find_adapter
    cost = find_adapter(model).cost(model)
    return [cost.num_tokens] * (cost.num_layers + 1)


def _top1(outputs: Tensor, labels: Tensor) -> float:
    return float((outputs.argmax(1) == labels).float().mean())


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "out of reach" in text:
        return "cannot reach target: " + text.split("allowed range is ")[-1].split(" (")[0]
    return f"n/a: {text[:120]}"


def accuracy_series(results: Sequence[Result]) -> dict:
    """``{method: [(measured FLOPs, top-1), ...]}`` of the measured rows, each from the unreduced point."""
    unreduced = next(r for r in results if api.is_identity(r.method))
    series: dict = {}
    for r in results:
        if not api.is_identity(r.method) and r.status == "ok":
            series.setdefault(r.method, [(1.0, unreduced.top1)]).append((r.flops, r.top1))
    return series


def format_table(results: Sequence[Result]) -> str:
    """A markdown table, one row per method and target."""
    lines = ["| method | target FLOPs | measured FLOPs | top-1 | agreement | output cosine | final tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.method} | {r.target:.0%} | {r.status} | | | | |")
            continue
        final = r.tokens[-1] if r.tokens else ""
        lines.append(f"| {r.method} | {r.target:.0%} | {r.flops:.1%} | {r.top1:.2%} | {r.agreement:.2%} | "
                     f"{r.cosine:.4f} | {final} |")
    return "\n".join(lines)


def imagefolder_batches(path: str, model: nn.Module, batch_size: int = 64, limit: Optional[int] = None) -> list:
    """Batches from a torchvision ImageFolder, resized and normalised for ``model`` (class folders
    must be in the order of the model's classes)."""
    from torchvision import datasets, transforms

    from .visualize import _normalization, input_size

    if not Path(path).is_dir():
        raise ValueError(f"data must be an ImageFolder directory (one folder per class), got {path!r}")
    height, width = input_size(model)
    mean, std = _normalization(model)
    transform = transforms.Compose([
        transforms.Resize(int(min(height, width) / 0.875)), transforms.CenterCrop((height, width)),
        transforms.ToTensor(), transforms.Normalize(mean, std),
    ])
    dataset = datasets.ImageFolder(path, transform=transform)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False))
