"""TCA: token condensation as training-free test-time adaptation for CLIP (Wang et al., "Is Less More? Exploring
Token Condensation as Training-free Test-time Adaptation", arXiv 2410.14729, ICCV 2025).

A :class:`TCA` runs a stream of test images through an open_clip CLIP, one image at a time, as online test-time
adaptation does. For each image it:

1. encodes it with domain-aware condensation (:mod:`vtr.adaptive.tca_condense`): fewer tokens in the later
   blocks, chosen with the domain anchors of the reservoir (from the first image on which it is ready);
2. takes the zero-shot logits of that embedding and their entropy, and adds the image's layer-wise CLS tokens to
   the reservoir under its predicted class (:mod:`vtr.adaptive.tca_reservoir`);
3. returns the zero-shot logits plus the reservoir's correction.

Nothing is trained and the model is not modified (no parameters, nothing to unpatch); the adaptation lives in
the reservoir, which :meth:`TCA.reset` empties (a new domain).

    tca = vtr.adaptive.TCA(clip_model, class_features)      # class_features: [K, D] text embeddings
    for image in stream:                                     # [1, 3, H, W] each, in order
        logits = tca(image)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import flop_counter

from .tca_condense import Encoded, check_tower, default_layers, encode
from .tca_reservoir import Reservoir, entropy

DEFAULTS = dict(rate=0.1, reservoir=3, scale=0.01, lambd=3.0, beta=5.0, centers=4)   # the official ImageNet-A config


class TCA:
    """Token condensation as test-time adaptation over a stream (module docstring).

    ``model``: an open_clip CLIP (or CustomTextCLIP) with a ViT image tower. ``class_features``: the class
    prompts' text embeddings ``[K, D]``. ``rate``: TCA's condensation rate ``R`` in ``[0, 1)`` (0: nothing
    condensed). ``layers``: the condensation blocks (default: 1/4, 1/2, 3/4 of the depth). ``reservoir``: entries
    per class. ``scale``, ``lambd``, ``beta``: the logit correction's layer weighting, strength and sharpness
    (``lambd`` 0: none). ``centers``: the merged tokens per condensation. ``anchors``: use the reservoir's domain
    anchors in condensation.
    """

    def __init__(self, model: nn.Module, class_features: Tensor, *, rate: float = DEFAULTS["rate"],
                 layers: Optional[Sequence[int]] = None, reservoir: int = DEFAULTS["reservoir"],
                 scale: float = DEFAULTS["scale"], lambd: float = DEFAULTS["lambd"], beta: float = DEFAULTS["beta"],
                 centers: int = DEFAULTS["centers"], anchors: bool = True):
        visual = getattr(model, "visual", None)
        if not isinstance(visual, nn.Module) or not hasattr(model, "logit_scale"):
            raise ValueError(f"TCA needs an open_clip CLIP model (with .visual and .logit_scale), got {type(model).__name__}")
        check_tower(visual)
        if not isinstance(class_features, Tensor) or class_features.dim() != 2:
            raise ValueError("class_features must be [K, D] (one text embedding per class), got "
                             f"{tuple(class_features.shape) if isinstance(class_features, Tensor) else type(class_features).__name__}")
        if not 0 <= rate < 1:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        depth = len(visual.transformer.resblocks)
        layers = default_layers(depth) if layers is None else tuple(layers)
        if any(not isinstance(l, int) or not 1 <= l < depth for l in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct block indices in [1, {depth}), got {layers}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if lambd < 0 or beta < 0:
            raise ValueError(f"lambd and beta must be >= 0, got lambd={lambd}, beta={beta}")
        if not isinstance(centers, int) or centers < 1:
            raise ValueError(f"centers must be an int >= 1, got {centers!r}")
        self.model, self.visual = model, visual
        self.text = F.normalize(class_features.detach(), dim=-1)
        self.rate, self.layers, self.centers, self.use_anchors = float(rate), layers, centers, anchors
        self.scale, self.lambd, self.beta = scale, lambd, beta
        self.reservoir = Reservoir(class_features.shape[0], reservoir)

    def reset(self) -> None:
        """Forget the stream (a new domain): an empty reservoir, no anchors."""
        self.reservoir.reset()

    def encode(self, images: Tensor) -> Encoded:
        """One pass of the condensed tower with the reservoir's current anchors (nothing is updated)."""
        anchors = self.reservoir.anchors() if self.use_anchors else None
        return encode(self.visual, images, anchors, self.rate, self.layers, self.centers)

    def zero_shot(self, features: Tensor) -> Tensor:
        """CLIP's zero-shot logits of image embeddings ``[B, E]``: scaled cosines with the class prompts."""
        return self.model.logit_scale.exp() * F.normalize(features, dim=-1) @ self.text.t().to(features.dtype)

    @torch.no_grad()
    def step(self, image: Tensor, update: bool = True) -> Tensor:
        """One image of the stream ``[1, 3, H, W]`` -> corrected logits ``[1, K]``; with ``update`` (the default)
        the reservoir learns from it first, as in the paper."""
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(f"step takes one image [1, 3, H, W], got {tuple(image.shape)}")
        encoded = self.encode(image)
        logits = self.zero_shot(encoded.features)
        tokens = encoded.cls_tokens[0]
        if update:
            self.reservoir.update(int(logits.argmax()), tokens, float(entropy(logits[0])))
        if self.lambd == 0:
            return logits
        return logits + self.reservoir.correction(tokens, self.scale, self.lambd, self.beta).to(logits)[None]

    def __call__(self, images: Tensor) -> Tensor:
        """The rows of ``images`` ``[B, 3, H, W]`` as consecutive images of the stream, in order -> ``[B, K]``."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        return torch.cat([self.step(images[i:i + 1]) for i in range(images.shape[0])])

    @torch.no_grad()
    def macs(self, image: Tensor) -> float:
        """MACs of the image tower for one image with the current anchors (matrix products, as
        :mod:`vtr.tools.profile` counts: no norms, softmax or activations)."""
        with flop_counter.FlopCounterMode(display=False) as counter:
            self.encode(image[:1])
        return counter.get_total_flops() / 2


__all__ = ["TCA", "DEFAULTS"]
