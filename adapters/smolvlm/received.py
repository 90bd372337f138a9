"""The attention each of SmolVLM's / Idefics3's visual tokens receives in its SigLIP tower (no [CLS] token there), for
the methods defined on the tower's attention (``Need.ATTENTION_RECEIVED``, :mod:`vtr.adapters.vlm.tower_attention`).

At the tower's last layer, the one ``get_image_features`` reads (``last_hidden_state``), per tile (the global view
is one); the patches the processor padded (``pixel_attention_mask``) neither attend nor receive, as in the tower. The
connector's pixel shuffle folds each ``s x s`` block of patches into one token; a token's score is the *sum* over
its block (the connector's own ``pixel_shuffle`` lays the scores out as it lays out the features): what its patches
receive together, as Qwen-VL's 2 x 2 merger sums them, so a tile's scores still add up as its patches' did.

Imports no other module of this package.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from vtr.core.plan import Reduction

from ..vlm import tower_attention


def feature_attention(model: nn.Module) -> nn.Module:
    """The attention of the tower's last encoder layer."""
    return model.model.vision_model.encoder.layers[-1].self_attn


def install(model: nn.Module, reduction: Reduction) -> None:
    if tower_attention.wanted(reduction, cls=False):
        tower_attention.install(model, feature_attention(model))


def uninstall(model: nn.Module) -> None:
    tower_attention.uninstall(model)


def shuffled(model: nn.Module, per_patch: Tensor) -> Tensor:
    """``[tiles, patches]`` scores as ``[tiles, tokens]``: the sum over each token's pixel-shuffle block."""
    connector = model.model.connector
    return connector.pixel_shuffle(per_patch[..., None], connector.scale_factor).sum(dim=-1)


def per_tile(model: nn.Module, run, tiles: int) -> tuple[Optional[list[Tensor]], float]:
    """Per tile of this tower call, ``[tokens]`` the attention each token receives, and the MACs it cost; (None, 0)
    without the hook."""
    scores, macs = tower_attention.take(run)
    if scores is None or scores.shape[0] != tiles:
        return None, macs
    return list(shuffled(model, scores)), macs


def expected_macs(model: nn.Module, reduction: Reduction) -> float:
    """The scores' MACs for one tile (every query row of the last layer)."""
    if not tower_attention.wanted(reduction, cls=False):
        return 0.0
    vision = model.config.vision_config
    return tower_attention.pass_macs(1, (vision.image_size // vision.patch_size) ** 2, vision.hidden_size)
