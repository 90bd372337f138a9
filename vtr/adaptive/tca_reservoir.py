"""TCA's domain-aware token reservoir and its logit correction (Wang et al., arXiv 2410.14729).

The reservoir keeps, per pseudo-label, the layer-wise CLS tokens of at most ``size`` confident test images:
a new image joins its predicted class; when the class overflows, the entry with the largest
``entropy + mean cosine similarity to the class's other entries`` leaves (uncertain and redundant ones go
first: the official code's ``div`` + ``token_sim`` rule, the similarity being of each entry's CLS tokens
averaged over layers). Entries stay sorted by entropy.

The per-class means of the kept CLS tokens are the *domain anchors* that guide condensation. They are offered
only once every class holds ``min(2, size)`` entries (the official code waits for two per class), so a
stream starts as plain zero-shot inference.

The correction is a token-level cache classifier: the image's CLS tokens are compared with every entry, layer
by layer, the cosines weighted by ``exp(linspace(0, 1, L) / scale)`` (normalised; ``scale`` 0.01 puts almost
all the weight on the last layers), and ``lambd * sum_entries exp(-beta * (1 - affinity)) * onehot(class)`` is
added to the zero-shot logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Entry:
    """One remembered test image: its layer-wise CLS tokens ``[L, D]`` and the entropy of its zero-shot
    prediction (natural log)."""

    tokens: Tensor
    entropy: float


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along the last dimension."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def layer_weights(num_layers: int, scale: float) -> Tensor:
    """``exp(linspace(0, 1, L) / scale)`` normalised to sum 1, in float64 (``scale`` 0.01 overflows nothing:
    the largest exponent is subtracted first)."""
    exponent = torch.linspace(0, 1, num_layers, dtype=torch.float64) / scale
    return torch.softmax(exponent, dim=0)


class Reservoir:
    """Per-class lists of :class:`Entry`, at most ``size`` each (see the module docstring for the rule)."""

    def __init__(self, num_classes: int, size: int = 3):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"reservoir size must be an int >= 1, got {size!r}")
        self.num_classes, self.size = num_classes, size
        self.entries: list[list[Entry]] = [[] for _ in range(num_classes)]

    def __len__(self) -> int:
        return sum(len(e) for e in self.entries)

    def reset(self) -> None:
        self.entries = [[] for _ in range(self.num_classes)]

    def update(self, label: int, tokens: Tensor, entropy: float) -> None:
        """Add one image to class ``label``; if the class overflows, drop its entry of highest
        ``entropy + mean cosine to the others`` (the new one included); keep the class sorted by entropy."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label must be in [0, {self.num_classes}), got {label}")
        group = self.entries[label]
        group.append(Entry(tokens.detach().clone(), float(entropy)))
        if len(group) > self.size:
            means = F.normalize(torch.stack([e.tokens.double().mean(0) for e in group]), dim=-1)
            similarity = means @ means.t()
            n = len(group)
            redundancy = (similarity.sum(1) - similarity.diagonal()) / (n - 1)
            score = torch.tensor([e.entropy for e in group], dtype=torch.float64) + redundancy
            group.pop(int(score.argmax()))
        group.sort(key=lambda e: e.entropy)

    def ready(self) -> bool:
        """Whether every class holds enough entries for the anchors to be used."""
        need = min(2, self.size)
        return all(len(group) >= need for group in self.entries)

    def anchors(self) -> Optional[Tensor]:
        """Per-class mean CLS tokens ``[K, L, D]``, or None until :meth:`ready`."""
        if not self.ready():
            return None
        return torch.stack([torch.stack([e.tokens for e in group]).mean(0) for group in self.entries])

    def correction(self, tokens: Tensor, scale: float = 0.01, lambd: float = 3.0, beta: float = 5.0) -> Tensor:
        """The logit correction ``[K]`` for one image's CLS tokens ``[L, D]`` (zeros for an empty reservoir)."""
        out = torch.zeros(self.num_classes, dtype=torch.float64)
        weights = layer_weights(tokens.shape[0], scale)
        for label, group in enumerate(self.entries):
            for e in group:
                cosine = F.cosine_similarity(tokens.double(), e.tokens.double(), dim=-1)   # [L]
                affinity = (cosine * weights).sum()
                out[label] += torch.exp(-beta * (1 - affinity))
        return (lambd * out).to(tokens.dtype)


__all__ = ["Entry", "Reservoir", "entropy", "layer_weights"]
