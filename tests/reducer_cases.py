"""Shared builders for the reducer tests (imported by test_drop/test_atf/test_query/test_pool)."""
from __future__ import annotations

import copy
from functools import lru_cache

import timm
import torch

from vtr.core.state import TokenState


def make_state(batch=2, tokens=17, channels=8, protected=1, padding=0, seed=0, requires_grad=False):
    """A random state; the last ``padding`` tokens of every row are padding (size 0)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator).requires_grad_(requires_grad)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    if padding:
        mask[:, tokens - padding:] = False
    return TokenState.start(x, protected, padding_mask=mask)


def tiny_vit(**overrides):
    """A 4-block ViT on 96x96 inputs (6x6 patch grid + CLS), random weights; a fresh copy each call."""
    return copy.deepcopy(_tiny_vit(tuple(sorted(overrides.items()))))


@lru_cache(maxsize=None)
def _tiny_vit(overrides: tuple):
    torch.manual_seed(0)
    kwargs = dict(depth=4, img_size=96, pretrained=False) | dict(overrides)
    return timm.create_model("vit_tiny_patch16_224", **kwargs).eval()


def images(batch=2, seed=0, size=96):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
