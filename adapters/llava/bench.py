"""LLaVA, LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video: the prompts of ``vtr bench`` (``vtr.tools.bench_vlm``), as the family's own processor
would give them: ``workload`` builds batch copies of text around one image (or video) with random
pixels; ``prompt`` gives what the language model's prefill reads, for the model as it is now (unreduced: the
model's own encoder; reduced before the language model: the adapter's ``prepare``, timed with ``timed``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..vlm.bench import text_ids
from . import before_lm, video


def workload(model: nn.Module, text: int, batch: int, image_size: Optional[int], video_frames: int,
             frames: Optional[str]) -> tuple[dict, int, str, dict]:
    """(inputs, visual tokens per prompt, description, extra ``vtr.patch`` keywords) of ``batch`` copies of one
    prompt: ``text`` text tokens around one image of ``image_size`` (default the model's), or on LLaVA-OneVision /
    NeXT-Video a ``video_frames``-frame video."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    half = text // 2
    if video.is_video_model(model):
        return _video_workload(model, text, batch, image_size, video_frames, frames)
    if video_frames:
        raise ValueError("videos are benchmarked on Qwen-VL or LLaVA-OneVision / NeXT-Video; a LLaVA prompt "
                         "holds one image")
    token = config.image_token_index
    side = config.vision_config.image_size
    next_ = "Next" in type(config).__name__
    full = 2 * side if next_ else side   # NeXT: a base view and 2 x 2 crops of the tower's size
    if image_size is not None and image_size != full:
        raise ValueError(f"this LLaVA takes {full}x{full} images (its vision tower's size), got {image_size}")
    if next_:   # the base view plus 4 crops; the model says how many tokens that packs into
        pixels = torch.randn(batch, 5, 3, side, side, generator=generator)
        vision = {"image_sizes": torch.tensor([[full, full]] * batch)}
        with torch.inference_mode():
            visual = len(model.model.get_image_features(pixels[:1], vision["image_sizes"][:1]).pooler_output[0])
    else:
        pixels, vision, visual = torch.randn(batch, 3, side, side, generator=generator), {}, config.image_seq_length
    ids = text_ids(text, min(token, config.text_config.vocab_size))
    row = ids[:half] + [token] * visual + ids[half:]
    return ({"input_ids": torch.tensor([row] * batch), "pixel_values": pixels, **vision}, visual,
            f"a {full}x{full} image", {})


def _video_workload(model: nn.Module, text: int, batch: int, image_size: Optional[int], video_frames: int,
                    frames: Optional[str]) -> tuple[dict, int, str, dict]:
    """LLaVA-OneVision / NeXT-Video: a video's frames are the tower's size, each pooled to a grid of tokens
    (OneVision adds one newline token per video); an image of any side is the base view and its AnyRes crops, as
    many tokens as the model's own ``get_image_features`` packs it into."""
    config = model.config
    side = config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    if video_frames:
        if image_size is not None and image_size != side:
            raise ValueError(f"this model takes {side}x{side} frames (its vision tower's size), got {image_size}")
        rows, cols = video.frame_grid(model)
        visual = video_frames * rows * cols + video.is_onevision(model)
        token = config.video_token_id
        shown = f"a {video_frames}-frame video of {side}x{side} ({rows}x{cols} tokens a frame)"
        vision = {"pixel_values_videos": torch.randn(batch, video_frames, 3, side, side, generator=generator)}
    else:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        full = image_size or side
        views = image_size_to_num_patches((full, full), config.image_grid_pinpoints, side)   # base view + crops
        vision = {"pixel_values": torch.randn(batch, views, 3, side, side, generator=generator),
                  "image_sizes": torch.tensor([[full, full]] * batch)}
        with torch.inference_mode():
            visual = len(model.model.get_image_features(vision["pixel_values"][:1],
                                                        vision["image_sizes"][:1]).pooler_output[0])
        token = config.image_token_id
        shown = f"a {full}x{full} image (the base view and {views - 1} crop{'s' * (views > 2)})"
    ids = text_ids(text, min(config.image_token_id, config.video_token_id, config.text_config.vocab_size))
    row = ids[:text // 2] + [token] * visual + ids[text // 2:]
    return ({"input_ids": torch.tensor([row] * batch), **vision}, visual, shown,
            {"frames": frames} if video_frames and frames else {})

def prompt(model: nn.Module, inputs: dict, before: bool, timed: Callable):
    """(vision seconds, prefill keywords, positions of decode step i) for the model as it is now; ``before``: it
    reduces before the language model (time that as the vision part)."""
    return (_video_prompt if video.is_video_model(model) else _image_prompt)(model, inputs, before, timed)


def _image_prompt(model: nn.Module, inputs: dict, before: bool, timed: Callable):
    """(vision seconds, prefill keywords, positions of decode step i) for the model as it is now."""
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    mask = torch.ones_like(ids)
    vision = {k: v for k, v in inputs.items() if k == "image_sizes"}
    if before:   # vision tower + reducer + compaction: what the patched model does before its language model
        prepare = lambda: before_lm.prepare(model, ids, mask, pixels, left=True, **vision)  # noqa: E731
        seconds, prepared = timed(prepare)
        ids, mask, image = prepared.input_ids, prepared.attention_mask, prepared.image_outputs
    else:
        encode = lambda: model.model.get_image_features(pixel_values=pixels, return_dict=True, **vision)  # noqa: E731
        seconds, image = timed(encode)
    length = ids.shape[1]
    return (seconds, dict(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": image}),
            lambda step: torch.full((ids.shape[0], 1), length + step, device=ids.device))


def _video_prompt(model: nn.Module, inputs: dict, before: bool, timed: Callable):
    """LLaVA-OneVision / NeXT-Video: as :func:`_image_prompt`, images and videos each through the model's own
    encoder (unreduced) or the adapter's ``prepare`` (reduced before the LM)."""
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    vision = {k: v for k, v in inputs.items() if k != "input_ids"}
    if before:   # vision tower + pooling + reducer + compaction
        prepare = lambda: video.prepare(model, ids, dict(vision, attention_mask=mask), True)  # noqa: E731
        seconds, compacted = timed(prepare)
        ids, mask = compacted.input_ids, compacted.model_inputs["attention_mask"]
        outputs = compacted.model_inputs["mm_encoder_outputs"]
    else:
        def encode() -> dict:
            outputs = {}
            if "pixel_values" in vision:
                outputs["image"] = model.model.get_image_features(vision["pixel_values"], vision["image_sizes"],
                                                                  return_dict=True)
            if "pixel_values_videos" in vision:
                outputs["video"] = model.model.get_video_features(vision["pixel_values_videos"], return_dict=True)
            return outputs
        seconds, outputs = timed(encode)
    length = ids.shape[1]
    return (seconds, dict(input_ids=ids, attention_mask=mask, mm_encoder_outputs=outputs),
            lambda step: torch.full((ids.shape[0], 1), length + step, device=ids.device))
