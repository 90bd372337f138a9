"""Shared model builders and harnesses for the tests (random weights, built from configs: no downloads).

Test modules import what they need from here (``from conftest import tiny_vit``); tests/ is on the path
because this file sits at its root. Tests are grouped by layer: core/, budget/, reducers/, adapters/, tools/.
"""
from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from functools import lru_cache

import pytest
import timm
import torch
from torch import nn

import vtr
from vtr.core import run as runs
from vtr.core.state import TokenState
from vtr.reducers import REDUCERS, Reducer, check_budget, dest_from_choice
from vtr.reducers.base import unit


@pytest.fixture
def one_intra_op_thread():
    """Bitwise comparisons across threads: one intra-op thread, so no op's reduction order depends on load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- timm ViTs covering every feature the adapter must honour --------------------------------------

def _randomize_layerscale(model):
    # LayerScale's default init (1e-5) would hide an adapter that skips it; make it matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.normal_(1.0, 0.5)
    return model


def build_timm(kind: str, depth: int = None) -> torch.nn.Module:
    """A small model of the given kind; ``depth`` overrides the (short) default depth."""
    torch.manual_seed(0)
    if kind == "vit_b16":
        model = timm.create_model("vit_base_patch16_224")
    elif kind == "tiny":
        model = timm.create_model("vit_tiny_patch16_224", depth=depth or 4)
    elif kind == "layerscale":
        model = _randomize_layerscale(timm.create_model("deit3_small_patch16_224", depth=depth or 4))
    elif kind == "qk_norm":
        model = timm.create_model("vit_small_patch16_224", depth=depth or 4, qk_norm=True)
    elif kind == "registers_avg":
        model = timm.create_model("vit_base_patch16_reg4_gap_256", depth=depth or 3, embed_dim=192, num_heads=3)
    elif kind == "dinov2_registers":
        model = _randomize_layerscale(timm.create_model("vit_small_patch14_reg4_dinov2", img_size=224, depth=depth or 3))
    elif kind == "distilled":
        model = timm.create_model("deit_small_distilled_patch16_224", depth=depth or 4)
    elif kind == "map_head":
        model = timm.create_model("vit_base_patch16_siglip_224", depth=depth or 3, embed_dim=192, num_heads=3)
    else:
        raise KeyError(kind)
    return model.eval()


def timm_images(model, batch=2, seed=0):
    size = (3, *model.patch_embed.img_size)
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


FEATURE_MODELS = ["tiny", "layerscale", "qk_norm", "registers_avg", "dinov2_registers", "distilled", "map_head"]


# -- a tiny ViT and token states for the reducer tests ---------------------------------------------

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


def vit_images(batch=2, seed=0, size=96):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- a test-only query-conditioned reducer (the adapters' conditioning plumbing) -------------------

class QueryProbe(Reducer):
    name = "query_probe"
    description = "test-only: keep the tokens closest to the query"
    needs = frozenset({"query"})
    seen: list = []

    def forward(self, state, num_kept, signals):
        check_budget(self, state, num_kept)
        QueryProbe.seen.append(signals)
        if num_kept == state.num_tokens:
            return state
        protected = state.num_protected
        tokens = signals.query_projection(state.x) if signals.query_projection is not None else state.x
        query = signals.query if signals.query.dim() == 3 else signals.query[:, None]
        score = (unit(tokens[:, protected:]) @ unit(query).transpose(1, 2)).amax(dim=-1)
        kept = score.topk(num_kept - protected, dim=1).indices.sort(dim=1).values
        return state.reduce(dest_from_choice(state, kept), num_kept)


@contextmanager
def probe():
    REDUCERS[QueryProbe.name] = QueryProbe
    QueryProbe.seen = []
    try:
        yield QueryProbe
    finally:
        del REDUCERS[QueryProbe.name]
        QueryProbe.seen = []


class SignalProbe(Reducer):
    """Test-only: asks for CLS attention, logs the signals, keeps the first ``num_kept`` tokens."""

    name = "signal_probe"
    description = "test-only: log signals, keep the leading tokens"
    needs = frozenset({"cls_attention", "metric"})
    seen: list = []

    def forward(self, state, num_kept, signals):
        check_budget(self, state, num_kept)
        SignalProbe.seen.append(signals)
        kept = torch.arange(num_kept - state.num_protected, device=state.x.device).expand(state.x.shape[0], -1)
        return state.reduce(dest_from_choice(state, kept), num_kept)


@contextmanager
def signal_probe():
    REDUCERS[SignalProbe.name] = SignalProbe
    SignalProbe.seen = []
    try:
        yield SignalProbe
    finally:
        del REDUCERS[SignalProbe.name]
        SignalProbe.seen = []
