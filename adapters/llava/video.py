"""LLaVA-OneVision and LLaVA-NeXT-Video: each image and each video keeps ``budget`` visual tokens, before the
language model (``vtr.adapters.vlm.items``) or, with ``layers=``, inside it (``vtr.adapters.vlm.in_llm``, told
what these prompts look like by :class:`VideoVisuals`); ``generate()`` unchanged.

Videos (``pixel_values_videos``, ``[videos, frames, channels, height, width]``): each frame's tokens are its
pooled patch grid (OneVision: bilinear to ``ceil(side/2)`` squared; NeXT-Video: its resampler's stride), frame
after frame. A video's budget is split across its frames (``frames=``), after an optional merge across
neighbouring frames (``temporal=``), and each frame reduced by the method (``vtr.adapters.vlm.video``);
OneVision's newline token after a video always stays and counts in the budget.

Images: each image's packed tokens (the base image, the AnyRes crops and their newlines, as the model's own
``get_image_features`` gives them) are reduced as one set to the budget: no split by crops as on LLaVA-NeXT,
and newline tokens are ordinary tokens here.

CLS attention (NeXT-Video, before the language model, for a reducer that reads it): the feature layer's CLS row
from the q/k hooks LLaVA uses; a video's pooled token carries its pooling window's sum, an image's packed token its
patch's value (newlines 0). OneVision's SigLIP tower has no CLS token: the attention each token receives at the
feature layer is given instead (``received``), mapped through the model's own packing and pooling.

Positions: as on LLaVA, the compacted prompt is numbered as usual (kept tokens get consecutive positions).

In-LLM pruning (``layers=``): each image and each video is one item of as many tokens as its features (as
``generate()`` pre-encodes them; a direct forward's pixel values are encoded the same way first, which is what the
model would do itself); its tokens are ranked all at once (no frame split, no ``frames=`` / ``temporal=``), and
newline tokens are ordinary tokens there, as on LLaVA-NeXT. Imports ``common``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from vtr.core import run as runs
from vtr.core.signals import Need

from ..vlm import calls
from ..vlm.calls import Compacted, Family
from ..vlm.visuals import Item, Visuals, split_placeholders
from ..vlm.items import compact_items, reduce_items, report_fields, split_items
from ..vlm.language import language_cost, prefill_macs
from ..vlm.prompt import pad_id, row_queries
from ..vlm.run import opened
from . import received
from .common import LlavaReport

WHERE = "before the language model (projector output, per image or video)"
NAME = "LLaVA-OneVision / NeXT-Video"
IMAGE_SIZES = ("image_sizes ([images, 2] height and width of each image, as the processor returns them) is needed "
               "with pixel_values")
IMAGE_KEYS = ("image_sizes", "vision_aspect_ratio", "batch_num_images")
SHARED_KEYS = ("vision_feature_layer", "vision_feature_select_strategy")


def video_classes() -> tuple:
    try:
        from transformers import LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration
    except ImportError:  # transformers is optional for vtr
        return ()
    return LlavaOnevisionForConditionalGeneration, LlavaNextVideoForConditionalGeneration


def is_video_model(model: nn.Module) -> bool:
    """``model`` is LLaVA-OneVision or LLaVA-NeXT-Video (images and videos, each of its own count)."""
    return isinstance(model, video_classes())


def is_onevision(model: nn.Module) -> bool:
    classes = video_classes()
    return bool(classes) and isinstance(model, classes[0])


def reference_side(model: nn.Module) -> int:
    """Rows (= cols) of one image's (or frame's) patch grid at the tower's own size."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


def frame_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, cols) of one video frame's tokens as the model pools them."""
    side = reference_side(model)
    if is_onevision(model):
        return math.ceil(side / 2), math.ceil(side / 2)
    stride = model.config.spatial_pool_stride
    return side // stride, side // stride


def cost(model: nn.Module, metric: str = "x"):
    """Language-model MACs of a reference image's visual tokens (one image at the tower's own size), per layer."""
    return language_cost(model, reference_side(model) ** 2, 0, has_cls=False)


def prepare(model: nn.Module, input_ids: Optional[Tensor], inputs: dict, left: bool) -> Compacted:
    """Encode the images and videos, reduce each, compact the prompt, record the report (in this call's run)."""
    if input_ids is None:
        raise ValueError("a vtr-patched LLaVA-OneVision / NeXT-Video needs input_ids with pixel values: the visual "
                         "tokens are found from config.image_token_id / video_token_id in input_ids")
    config, reduction = model.config, model._vtr
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    shared = {key: inputs[key] for key in SHARED_KEYS if key in inputs}
    placeholders = {"image": input_ids == config.image_token_id, "video": input_ids == config.video_token_id}
    onevision = is_onevision(model)
    with opened(model) as run:
        outputs, items, attention, scores, tower_macs = {}, [], [], [], 0.0
        if inputs.get("pixel_values") is not None:
            if inputs.get("image_sizes") is None:
                raise ValueError(IMAGE_SIZES)
            images = {key: inputs[key] for key in IMAGE_KEYS if key in inputs}
            outputs["image"] = model.model.get_image_features(inputs["pixel_values"], return_dict=True, **images,
                                                              **shared)
            features = list(outputs["image"].pooler_output)
            items += split_items(features, [None] * len(features), placeholders["image"], "image")
            if onevision:
                found, macs = received.images(model, run, shared, images, features)
                scores, tower_macs = scores + (found or [None] * len(features)), tower_macs + macs
            rows = cls_rows(model, run, shared)
            attention.extend([None] * len(features) if rows is None else packed_attention(model, rows,
                                                                                          inputs["image_sizes"]))
        if inputs.get("pixel_values_videos") is not None:
            videos = inputs["pixel_values_videos"]
            outputs["video"] = model.model.get_video_features(videos, return_dict=True, **shared)
            frames, (rows, cols) = videos.shape[1], frame_grid(model)
            tokens = frames * rows * cols
            pooled = outputs["video"].pooler_output
            suffixes = [video[tokens:] for video in pooled] if pooled.shape[1] > tokens else None
            items += split_items([video[:tokens] for video in pooled], [(frames, rows, cols)] * len(pooled),
                                 placeholders["video"], "video", suffixes)
            if onevision:
                found, macs = received.videos(model, run, shared, len(pooled), frames)
                scores, tower_macs = scores + (found or [None] * len(pooled)), tower_macs + macs
            rows = cls_rows(model, run, shared)
            attention.extend([None] * len(pooled) if rows is None else pooled_attention(model, rows, len(pooled)))
        rows_of = torch.tensor([item.row for item in items], dtype=torch.long)
        queries = None
        relevance = reduction.visual.frames == "relevance" and "video" in outputs
        if Need.QUERY in reduction.reducer.needs or relevance:
            queries = row_queries(model, input_ids, mask, placeholders["image"] | placeholders["video"], rows_of,
                                  run.query)
        reduced, reducer_macs = reduce_items(reduction, items, queries, cost(model, reduction.metric),
                                             received=scores if scores and None not in scores else None,
                                             attention=None if None in attention else attention)
        reducer_macs += tower_macs   # OneVision: the attention each token receives, a pass the fused kernel skips
        ids, new_mask, kept_positions = compact_items(input_ids, mask, placeholders, items, reduced,
                                                      pad_id(model, config.image_token_id, config.video_token_id), left)
        if "image" in outputs:
            outputs["image"].pooler_output = [r.features for item, r in zip(items, reduced) if item.kind == "image"]
        if "video" in outputs:
            outputs["video"].pooler_output = _stacked([r.features for item, r in zip(items, reduced)
                                                       if item.kind == "video"])
        visual = (ids == config.image_token_id) | (ids == config.video_token_id)
        runs.record(reduction, LlavaReport(
            where=WHERE, visual_tokens_before=(placeholders["image"] | placeholders["video"]).sum(1),
            visual_tokens_after=visual.sum(1), kept_positions=kept_positions,
            prefill_macs=prefill_macs(model, new_mask.sum(1)), prefill_macs_unreduced=prefill_macs(model, mask.sum(1)),
            reducer_macs=reducer_macs, **report_fields(items, reduced)))
        return Compacted(ids, kept_positions, dict(attention_mask=new_mask.to(mask.dtype), mm_encoder_outputs=outputs))


# -- LLaVA-NeXT-Video: the CLS row of the feature layer, carried to the tokens the language model reads --------------

def cls_rows(model: nn.Module, run, shared: dict) -> Optional[Tensor]:
    """``[images' parts or videos' frames, side * side]`` the feature layer's CLS row over the patches, from the q/k
    this tower call left in the run (NeXT-Video, before the language model, for a reducer that reads it); None
    without them or where the features are not the patches alone (``vision_feature_select_strategy="full"``)."""
    from .before_lm import _cls_row

    row = _cls_row(model, run)
    strategy = shared.get("vision_feature_select_strategy", model.config.vision_feature_select_strategy)
    if row is None or strategy != "default" or shared.get("vision_feature_layer") not in (
            None, model.config.vision_feature_layer):
        return None
    return row[:, 1:]


def packed_attention(model: nn.Module, rows: Tensor, image_sizes) -> list[Tensor]:
    """Per image, ``[its packed tokens]`` the CLS attention of the patch each packed token is (0 for a newline), by
    the model's own packing (:func:`vtr.adapters.llava.common.layout`)."""
    from .common import layout

    layouts = [layout(model, size) for size in torch.as_tensor(image_sizes).view(-1, 2).tolist()]
    found = []
    for geometry, parts in zip(layouts, rows.split([g.num_crops + 1 for g in layouts])):
        source = geometry.source.to(parts.device)
        found.append(torch.where(source >= 0, parts.flatten()[source.clamp_min(0)], 0.0))
    return found


def pooled_attention(model: nn.Module, rows: Tensor, videos: int) -> Optional[list[Tensor]]:
    """Per video, ``[frames * rows * cols]`` the CLS attention each pooled token carries: the sum over its pooling
    window (the resampler averages or takes the max of those patches); None for a learned (conv) resampler."""
    if model.config.spatial_pool_mode not in ("average", "max"):
        return None
    side, stride = reference_side(model), model.config.spatial_pool_stride
    pooled = torch.nn.functional.avg_pool2d(rows.view(-1, 1, side, side), stride, stride) * stride * stride
    return list(pooled.reshape(videos, -1))


def _stacked(videos: list[Tensor]) -> Tensor:
    """The videos' features as the model's own ``[videos, tokens, D]`` (every video of a batch keeps as many: the
    same frames and budget)."""
    counts = {len(v) for v in videos}
    if len(counts) != 1:
        raise ValueError(f"the videos of one call kept different numbers of tokens {sorted(counts)}; the model takes "
                         "them as one tensor, so they must have as many frames of one size")
    return torch.stack(videos)


FAMILY = Family(prepare, ("pixel_values", "pixel_values_videos", "attention_mask", *IMAGE_KEYS, *SHARED_KEYS),
                LlavaReport, WHERE, NAME)


def generate(model: nn.Module, generate_fn: Callable, inputs: Optional[Tensor], *args, **kwargs):
    return calls.generate(model, FAMILY, generate_fn, inputs, *args, **kwargs)


def forward(model: nn.Module, original_forward: Callable, arguments: dict):
    return calls.forward(model, FAMILY, original_forward, arguments)


# -- in-LLM pruning -----------------------------------------------------------------------------------------

class VideoVisuals(Visuals):
    """In-LLM pruning's view of a OneVision / NeXT-Video prompt: the images (each its packed tokens), then the
    videos (each its frames' pooled tokens, and OneVision's newline), each as long as its encoded features."""

    report_kind = LlavaReport

    def tokens(self, model: nn.Module) -> tuple[int, int]:
        return reference_side(model) ** 2, 0

    def placeholder(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)

    def items(self, model: nn.Module, input_ids: Tensor, arguments: dict, run) -> list[Item]:
        encoded, found = arguments.get("mm_encoder_outputs") or {}, []
        for kind, token in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
            placeholder = input_ids == token
            if not bool(placeholder.any()):
                continue
            if encoded.get(kind) is None:
                raise ValueError(f"the prompt holds {kind} tokens but the call has no {kind} pixel values: in-LLM "
                                 f"pruning on {NAME} counts each {kind}'s tokens from its features")
            counts = [len(f) for f in encoded[kind].pooler_output]
            rows, cols = frame_grid(model)
            videos = [(count // (rows * cols), rows, cols) for count in counts] if kind == "video" else None
            found += split_placeholders(placeholder, counts, None, kind, videos)
        return found

    def check_generate(self, model: nn.Module, kwargs: dict) -> None:
        if kwargs.get("pixel_values") is not None and kwargs.get("image_sizes") is None:
            raise ValueError(IMAGE_SIZES)

    def report_fields(self, items: list[Item]) -> dict:
        return {"kinds": [item.kind for item in items], "grids": [item.video_grid for item in items]}


def encoded(model: nn.Module, arguments: dict) -> dict:
    """A forward's keywords with its pixel values encoded into ``mm_encoder_outputs``, as ``generate()`` hands them
    to its forwards: in-LLM pruning reads each image's and video's token count from its features."""
    outputs = dict(arguments.get("mm_encoder_outputs") or {})
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if arguments.get(key) is not None and outputs.get(kind) is not None:
            raise ValueError(f"give {key} or mm_encoder_outputs[{kind!r}], not both: which features the {kind}s "
                             "have would be ambiguous")
    shared = {key: arguments[key] for key in SHARED_KEYS if arguments.get(key) is not None}
    if arguments.get("pixel_values") is not None:
        if arguments.get("image_sizes") is None:
            raise ValueError(IMAGE_SIZES)
        images = {key: arguments.pop(key) for key in IMAGE_KEYS if key in arguments}
        images = {key: value for key, value in images.items() if value is not None}
        outputs["image"] = model.model.get_image_features(arguments.pop("pixel_values"), return_dict=True, **images,
                                                          **shared)
    if arguments.get("pixel_values_videos") is not None:
        outputs["video"] = model.model.get_video_features(arguments.pop("pixel_values_videos"), return_dict=True,
                                                          **shared)
    if outputs:
        arguments["mm_encoder_outputs"] = outputs
    return arguments
