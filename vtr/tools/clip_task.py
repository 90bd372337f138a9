"""A tiny CLIP trained here, and a domain shift it was not trained on (the TCA benchmark's task).

No pretrained CLIP can be downloaded here, so one is built from a tiny open_clip config and trained
contrastively on the fidelity task's procedural scenes (:func:`vtr.tools.fidelity.make_images`: a
glyph on clutter), each captioned with the glyph's name ("a photo of a ring"). Zero-shot
classification then compares an image with the class prompts. The shift (:func:`shift`) is applied
at test time only: a colour cast, a texture (a sinusoidal grating) over the whole scene and pixel
noise, so zero-shot accuracy drops and test-time adaptation has something to recover.

The model trains once on CPU (a few minutes, one thread) and is cached in the user cache dir
(``$VTR_CACHE``, as the fidelity ViT is), never in the repository.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fidelity import Task, keyed_checkpoint, make_images, trained_once, warmup_cosine

CLASS_NAMES = ("square", "frame", "plus", "cross", "bars", "columns", "triangle", "ring")
TEMPLATES = ("a photo of a {}", "a drawing of a {}", "a {} on clutter", "the {}")
PROMPT = TEMPLATES[0]   # the zero-shot prompt
CONTEXT = 8             # <sot> + at most 6 words + <eot>


def vocabulary() -> list[str]:
    """Word-level vocabulary: padding 0, start 1, the words, end-of-text last (open_clip pools the text
    at the highest token id, so ``<eot>`` must be the largest)."""
    words = sorted({w for t in TEMPLATES for w in t.replace("{}", "").split()} | set(CLASS_NAMES))
    return ["<pad>", "<sot>", *words, "<eot>"]


def tokenize(texts: list[str]) -> Tensor:
    """``[len(texts), CONTEXT]`` token ids; an unknown word raises ValueError."""
    ids = {w: i for i, w in enumerate(vocabulary())}
    out = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    for row, text in enumerate(texts):
        words = text.split()
        if len(words) > CONTEXT - 2 or any(w not in ids for w in words):
            raise ValueError(f"cannot tokenize {text!r}: at most {CONTEXT - 2} words of {vocabulary()[2:-1]}")
        seq = [ids["<sot>"], *(ids[w] for w in words), ids["<eot>"]]
        out[row, :len(seq)] = torch.tensor(seq)
    return out


@dataclass(frozen=True)
class ClipTraining:
    """Model size and recipe; part of the cache key with the task."""

    embed_dim: int = 32
    width: int = 48
    depth: int = 8
    heads: int = 3
    text_width: int = 32
    text_depth: int = 2
    train_images: int = 8000
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


TASK = Task()   # 32 px, 4 px patches (64 tokens), 8 glyphs, 24 clutter marks


def build_clip(task: Task = TASK, training: ClipTraining = ClipTraining()) -> nn.Module:
    """An untrained tiny open_clip ``CLIP`` for the task (ViT tower with a CLS token, ``'tok'`` pooling)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=training.depth, width=training.width, head_width=training.width // training.heads,
                           patch_size=task.patch_size, image_size=task.image_size)
    text = CLIPTextCfg(context_length=CONTEXT, vocab_size=len(vocabulary()), width=training.text_width,
                       heads=2, layers=training.text_depth)
    return open_clip.CLIP(embed_dim=training.embed_dim, vision_cfg=vision, text_cfg=text)


def class_features(model: nn.Module, template: str = PROMPT) -> Tensor:
    """The zero-shot classifier: one text embedding per class ``[K, D]`` (not normalised)."""
    return model.encode_text(tokenize([template.format(name) for name in CLASS_NAMES]))


def _loss(model: nn.Module, images: Tensor, labels: Tensor, template: str) -> tuple[Tensor, Tensor]:
    """CLIP's symmetric contrastive loss with the batch's captions deduplicated: the K class captions (one
    template), image-to-text over them, text-to-image over the batch's images with every image of the class
    a positive (a batch of 64 holds each class several times: duplicates must not be negatives)."""
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(class_features(model, template), dim=-1)
    logits = model.logit_scale.exp() * image @ text.t()                      # [B, K]
    image_loss = F.cross_entropy(logits, labels)
    targets = F.one_hot(labels, len(CLASS_NAMES)).t().float()               # [K, B]
    present = targets.sum(1) > 0
    text_logp = F.log_softmax(logits.t()[present], dim=1)
    text_loss = -(text_logp * targets[present] / targets[present].sum(1, keepdim=True)).sum(1).mean()
    return (image_loss + text_loss) / 2, logits


def train_clip(task: Task = TASK, training: ClipTraining = ClipTraining(), log=print) -> nn.Module:
    """Contrastive training from scratch on CPU, one thread (AdamW, warm-up + cosine, vertical flips)."""
    torch.manual_seed(training.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_clip(task, training)
    images, labels = make_images(task, training.train_images, seed=training.seed + 1)
    steps = -(-len(images) // training.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, steps * training.epochs)
    generator = torch.Generator().manual_seed(training.seed)
    model.train()
    start = time.time()
    for epoch in range(training.epochs):
        order, correct = torch.randperm(len(images), generator=generator), 0
        for step in range(steps):
            index = order[step * training.batch_size:(step + 1) * training.batch_size]
            x, y = images[index], labels[index]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(2), x)
            template = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=generator))]
            loss, logits = _loss(model, x, y, template)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            correct += int((logits.argmax(1) == y).sum())
        log(f"epoch {epoch + 1}/{training.epochs}: train zero-shot top-1 {correct / len(images):.3f} "
            f"({time.time() - start:.0f}s)")
    torch.set_num_threads(threads)
    return model.eval()


def checkpoint_path(task: Task = TASK, training: ClipTraining = ClipTraining(), root: Optional[Path] = None) -> Path:
    return keyed_checkpoint("clip-task", {"task": asdict(task), "training": asdict(training), "names": CLASS_NAMES,
                                          "templates": TEMPLATES, "version": 1}, root)


def trained_clip(task: Task = TASK, training: ClipTraining = ClipTraining(), *, root: Optional[Path] = None,
                 retrain: bool = False, log=print) -> nn.Module:
    """The tiny CLIP, trained once and then loaded from the cache."""
    return trained_once(checkpoint_path(task, training, root), lambda: build_clip(task, training),
                        lambda: train_clip(task, training, log=log), retrain=retrain, log=log, what="the task CLIP")


# --- the domain shift --------------------------------------------------------------------------

SHIFTS = ("cast", "texture", "noise")


def shift(images: Tensor, kinds: tuple[str, ...] = SHIFTS, strength: float = 1.0, seed: int = 0) -> Tensor:
    """The test-time domain: ``images`` (normalised as :func:`make_images` returns them) under a colour cast
    (per-channel gain and offset, one per stream), a texture (a sinusoidal grating of random angle and period
    per image) and pixel noise. ``strength`` scales all three (0: unchanged)."""
    unknown = [k for k in kinds if k not in SHIFTS]
    if unknown:
        raise ValueError(f"kinds must be among {SHIFTS}, got {unknown}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    g = torch.Generator().manual_seed(seed)
    x = images.clone()
    n, _, size, _ = x.shape
    if "cast" in kinds:   # the whole stream is seen through one tinted lens: a domain, not per-image noise
        gain = 1 + strength * torch.tensor([0.35, -0.25, -0.45])
        offset = strength * torch.tensor([0.6, 0.2, -0.5])
        x = x * gain[None, :, None, None] + offset[None, :, None, None]
    if "texture" in kinds:
        angle = torch.rand(n, generator=g) * math.pi
        period = 3 + 3 * torch.rand(n, generator=g)
        yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
        phase = (xx[None] * angle.cos()[:, None, None] + yy[None] * angle.sin()[:, None, None]) / period[:, None, None]
        x = x + strength * 0.8 * torch.sin(2 * math.pi * phase)[:, None]
    if "noise" in kinds:
        x = x + strength * 0.5 * torch.randn(x.shape, generator=g)
    return x


__all__ = ["CLASS_NAMES", "TEMPLATES", "PROMPT", "TASK", "ClipTraining", "SHIFTS", "vocabulary", "tokenize",
           "build_clip", "class_features", "train_clip", "checkpoint_path", "trained_clip", "shift"]
