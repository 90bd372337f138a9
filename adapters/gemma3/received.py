"""The attention each of Gemma 3's visual tokens receives in its SigLIP tower (no [CLS] token there), for the methods
defined on the tower's attention (``Need.ATTENTION_RECEIVED``, :mod:`vtr.adapters.vlm.tower_attention`).

At the tower's last layer, the one ``get_image_features`` reads (``last_hidden_state``), per image (each pan-and-scan
crop is one). The projector average-pools the patch grid to ``mm_tokens_per_image`` tokens; a token's score is the
sum over the same pooling window (the projector's own ``avg_pool`` times the window's area): what its patches receive
together, ranked as their mean would be.

Imports no other module of this package.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from vtr.core.plan import Reduction

from ..vlm import tower_attention


def feature_attention(model: nn.Module) -> nn.Module:
    """The attention of the tower's last encoder layer."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn


def install(model: nn.Module, reduction: Reduction) -> None:
    if tower_attention.wanted(reduction, cls=False):
        tower_attention.install(model, feature_attention(model))


def uninstall(model: nn.Module) -> None:
    tower_attention.uninstall(model)


def pooled(model: nn.Module, per_patch: Tensor) -> Tensor:
    """``[images, patches]`` scores as ``[images, mm_tokens_per_image]``: the sum over each pooling window."""
    projector = model.model.multi_modal_projector
    side = projector.patches_per_image
    windows = projector.avg_pool(per_patch.view(-1, 1, side, side)) * projector.kernel_size ** 2
    return windows.flatten(1)


def per_image(model: nn.Module, run, images: int) -> tuple[Optional[list[Tensor]], float]:
    """Per image of this tower call, ``[tokens]`` the attention each token receives, and the MACs it cost; (None, 0)
    without the hook."""
    scores, macs = tower_attention.take(run)
    if scores is None or scores.shape[0] != images:
        return None, macs
    return list(pooled(model, scores)), macs


def expected_macs(model: nn.Module, reduction: Reduction) -> float:
    """The scores' MACs for one image (every query row of the last layer)."""
    if not tower_attention.wanted(reduction, cls=False):
        return 0.0
    vision = model.config.vision_config
    return tower_attention.pass_macs(1, (vision.image_size // vision.patch_size) ** 2, vision.hidden_size)
