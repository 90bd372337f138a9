"""The attention each of LLaVA-OneVision's visual tokens receives in its SigLIP tower (no [CLS] token there), for the
methods defined on the tower's attention (``Need.ATTENTION_RECEIVED``, :mod:`vtr.adapters.vlm.tower_attention`).

At the layer the model reads (``vision_feature_layer``, one int), per tower image: an image's base view and each of
its AnyRes crops, a video's frames. The scores then take the very path the features take, through the model's own
functions with the scores as a one-channel feature: an image's through ``pack_image_features`` (crops laid out in
their grid, the padding cut away, the whole bilinearly shrunk where it exceeds ``anyres_max_N``, a newline after each
row, which scores 0: it is no patch), a video's frames through ``apply_pooling`` (bilinear to half the side). An
untouched patch keeps its own score and a resampled token gets the blend of its neighbours' scores that its feature
is of theirs (bilinear weights overlap, so there is no block to sum over; the blend also keeps the base view's and
the crops' scores on one scale, each a softmax over its own view).

Imports no other module of this package (the front calls it for OneVision only).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vtr.core.plan import Reduction

from ..vlm import tower_attention


def feature_attention(model: nn.Module) -> Optional[nn.Module]:
    """The attention of the layer OneVision reads its features from; None where that is the embeddings or several
    layers (concatenated)."""
    layers = model.model.vision_tower.encoder.layers
    index = tower_attention.feature_layer_index(model.config.vision_feature_layer, len(layers))
    return None if index is None else layers[index].self_attn


def install(model: nn.Module, reduction: Reduction) -> None:
    attention = feature_attention(model)
    if attention is not None and tower_attention.wanted(reduction, cls=False):
        tower_attention.install(model, attention)


def uninstall(model: nn.Module) -> None:
    tower_attention.uninstall(model)


def _patches(model: nn.Module, run, shared: dict, views: int) -> tuple[Optional[Tensor], float]:
    """``[views, patches]`` scores of this tower call's views as the features select them; (None, its MACs) where
    the call reads another layer than the hooked one or the counts disagree."""
    scores, macs = tower_attention.take(run)
    layer = shared.get("vision_feature_layer")
    if scores is None or scores.shape[0] != views or layer not in (None, model.config.vision_feature_layer):
        return None, macs
    strategy = shared.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
    return (scores[:, 1:] if strategy == "default" else scores), macs   # as the features: SigLIP has no CLS to drop


def images(model: nn.Module, run, shared: dict, image_inputs: dict, features: list[Tensor]) -> tuple[
        Optional[list[Tensor]], float]:
    """Per image of this tower call, ``[its packed tokens]`` the attention each receives, and the MACs it cost."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    sizes = torch.as_tensor(image_inputs["image_sizes"]).view(-1, 2)
    config = model.config
    batch_num_images = image_inputs.get("batch_num_images")
    patching = [True] * len(sizes) if batch_num_images is None else [n == 1 for n in batch_num_images for _ in range(n)]
    views = [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                       patch_size=config.vision_config.image_size) if crop else 1
             for size, crop in zip(sizes.tolist(), patching)]
    scores, macs = _patches(model, run, shared, sum(views))
    if scores is None:
        return None, macs
    aspect = image_inputs.get("vision_aspect_ratio") or config.vision_aspect_ratio
    packed, _ = model.model.pack_image_features(list(scores[..., None].split(views)), sizes,
                                                image_newline=scores.new_zeros(1), vision_aspect_ratio=aspect)
    found = [p[:, 0] for p in packed]
    if [len(f) for f in found] != [len(f) for f in features]:
        return None, macs
    return found, macs


def videos(model: nn.Module, run, shared: dict, count: int, frames: int) -> tuple[Optional[list[Tensor]], float]:
    """Per video of this tower call, ``[frames * rows * cols]`` the attention each pooled token receives (its
    newline, which is no patch, left out), and the MACs it cost."""
    scores, macs = _patches(model, run, shared, count * frames)
    if scores is None:
        return None, macs
    pooled = model.model.apply_pooling(scores[..., None])[..., 0]           # [videos * frames, rows * cols]
    return list(pooled.reshape(count, -1)), macs


def expected_macs(model: nn.Module, reduction: Reduction) -> float:
    """The scores' MACs for the reference image (one view at the tower's own size)."""
    attention = feature_attention(model)
    if attention is None or not tower_attention.wanted(reduction, cls=False):
        return 0.0
    vision = model.config.vision_config
    return tower_attention.pass_macs(1, (vision.image_size // vision.patch_size) ** 2, attention.q_proj.out_features)
