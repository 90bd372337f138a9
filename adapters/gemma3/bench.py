"""Gemma 3: the prompts of ``vtr bench`` (``vtr.tools.bench_vlm``): ``workload`` builds batch copies of text around
one image (``<start_of_image>``, its pooled tokens, ``<end_of_image>``) with random pixels; ``prompt`` gives what
the language model's prefill reads for the model as it is now (reduced before the LM: the adapter's ``prepare``,
timed with ``timed``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..vlm.bench import text_ids
from . import before_lm
from .common import image_tokens


def workload(model: nn.Module, text: int, batch: int, image_size: Optional[int], video_frames: int,
             frames: Optional[str]) -> tuple[dict, int, str, dict]:
    config = model.config
    side = config.vision_config.image_size
    if video_frames:
        raise ValueError("Gemma 3 takes images only: leave out --video-frames")
    if image_size not in (None, side):
        raise ValueError(f"this Gemma 3 takes {side}x{side} images (its tower's size), got {image_size}")
    special = (config.image_token_id, config.boi_token_id, config.eoi_token_id)
    ids = text_ids(max(text - 2, 0), min(*special, config.text_config.vocab_size))
    visual = image_tokens(model)
    row = ids[:text // 2] + [config.boi_token_id] + [config.image_token_id] * visual + [config.eoi_token_id] + \
        ids[text // 2:]
    input_ids = torch.tensor([row] * batch)
    pixels = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    return ({"input_ids": input_ids, "token_type_ids": (input_ids == config.image_token_id).long(),
             "pixel_values": pixels}, visual, f"a {side}x{side} image", {})


def prompt(model: nn.Module, inputs: dict, before: bool, timed: Callable):
    """(vision seconds, prefill keywords, positions of decode step i) for the model as it is now."""
    ids, types = inputs["input_ids"], inputs["token_type_ids"]
    mask = torch.ones_like(ids)
    if before:   # vision tower + pooling + reducer + compaction
        seconds, compacted = timed(lambda: before_lm.prepare(model, ids, dict(inputs, attention_mask=mask), True))
        ids, extra = compacted.input_ids, compacted.model_inputs
    else:
        seconds, image = timed(lambda: model.model.get_image_features(inputs["pixel_values"], return_dict=True))
        extra = dict(attention_mask=mask, token_type_ids=types, mm_encoder_outputs={"image": image})
    length = ids.shape[1]
    return (seconds, dict(input_ids=ids, **extra),
            lambda step: torch.full((ids.shape[0], 1), length + step, device=ids.device))
