"""The [CLS] attention row of InternVL's vision tower (InternViT), for the methods defined on the tower's attention
(``Need.CLS_ATTENTION``, :mod:`vtr.adapters.vlm.tower_attention`).

InternViT has a real [CLS] token (``InternVLVisionEmbeddings.cls_token``): ``get_image_features`` drops it
(``vision_feature_select_strategy="default"``) before the pixel shuffle, but the layer it reads
(``vision_feature_layer``) still computes its row, so vtr gives that row (head mean, the [CLS] query's softmax over
every token, from the layer's own q and k after its q/k norms) rather than the attention each token receives: the
[CLS] row is what FasterVLM, VisPruner and VisionZip rank by wherever a tower has one. Per tile (the thumbnail is
one). The pixel shuffle folds each 2 x 2 block of patches (``1 / downsample_ratio`` squared) into one token; a token's
score is the *sum* over its block (the model's own ``pixel_shuffle`` lays the row out as it lays out the features):
the attention the [CLS] token pays its patches together, as Qwen-VL's merger sums its 2 x 2.

Imports no other module of this package.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from vtr.core.plan import Reduction

from ..vlm import tower_attention


def feature_attention(model: nn.Module) -> Optional[nn.Module]:
    """The attention of the layer ``get_image_features`` reads, or None where it reads none (the embeddings, several
    layers) or keeps the [CLS] token among the features (any strategy but ``"default"``)."""
    layers = model.model.vision_tower.encoder.layer
    index = tower_attention.feature_layer_index(model.config.vision_feature_layer, len(layers))
    if index is None or model.config.vision_feature_select_strategy != "default":
        return None
    return layers[index].attention


def install(model: nn.Module, reduction: Reduction) -> None:
    attention = feature_attention(model)
    if attention is not None and tower_attention.wanted(reduction, cls=True):
        tower_attention.install(model, attention, cls=True)


def uninstall(model: nn.Module) -> None:
    tower_attention.uninstall(model)


def shuffled(model: nn.Module, cls_row: Tensor) -> Tensor:
    """``[tiles, 1 + patches]`` [CLS] rows as ``[tiles, tokens]``: the patches' (the [CLS] column dropped, as the
    features drop it), summed over each token's pixel-shuffle block."""
    patches = cls_row[:, 1:]
    side = int(round(patches.shape[1] ** 0.5))
    grid = model.model.pixel_shuffle(patches.reshape(-1, side, side, 1), scale_factor=model.config.downsample_ratio)
    return grid.reshape(patches.shape[0], -1, grid.shape[-1]).sum(dim=-1)


def per_tile(model: nn.Module, run, tiles: int) -> tuple[Optional[list[Tensor]], float]:
    """Per tile of this tower call, ``[tokens]`` the [CLS] attention each token carries, and the MACs it cost;
    (None, 0) without the hook."""
    scores, macs = tower_attention.take(run)
    if scores is None or scores.shape[0] != tiles:
        return None, macs
    return list(shuffled(model, scores)), macs


def expected_macs(model: nn.Module, reduction: Reduction) -> float:
    """The [CLS] row's MACs for one tile."""
    attention = feature_attention(model)
    if attention is None or not tower_attention.wanted(reduction, cls=True):
        return 0.0
    side = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    side, patch = (side[0] if isinstance(side, (list, tuple)) else side), (patch[0] if isinstance(patch, (list, tuple))
                                                                           else patch)
    return tower_attention.pass_macs(1, (side // patch) ** 2 + 1, attention.q_proj.out_features, cls=True)
