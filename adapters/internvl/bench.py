"""InternVL: the prompts of ``vtr bench`` (``vtr.tools.bench_vlm``): ``workload`` builds batch copies of text around
one image cut into 2 x 2 dynamic tiles and its thumbnail (``<img>``, 5 tiles' placeholders, ``</img>``) with random
pixels; ``prompt`` gives what the language model's prefill reads for the model as it is now (reduced before the
LM: the adapter's ``prepare``, timed with ``timed``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..vlm.bench import text_ids
from . import before_lm
from .common import tile_side, tile_tokens

TILES = 2 * 2 + 1   # a 2 x 2 grid of tiles and the thumbnail


def workload(model: nn.Module, text: int, batch: int, image_size: Optional[int], video_frames: int,
             frames: Optional[str]) -> tuple[dict, int, str, dict, int]:
    """(inputs, visual tokens per prompt, description, extra ``vtr.patch`` keywords, tokens a budget covers: one
    tile's) of ``batch`` copies of one prompt."""
    config = model.config
    side = tile_side(model)
    if video_frames:
        raise ValueError("the InternVL benchmark takes images only: leave out --video-frames")
    if image_size not in (None, side):
        raise ValueError(f"this InternVL takes {side}x{side} tiles (its tower's size), got {image_size}")
    image = config.image_token_id
    ids = text_ids(max(text - 2, 0) + 2, min(image, config.text_config.vocab_size))
    start, end, ids = ids[-2], ids[-1], ids[:max(text - 2, 0)]    # <img> and </img>: ordinary ids here
    row = ids[:text // 2] + [start] + [image] * (TILES * tile_tokens(model)) + [end] + ids[text // 2:]
    pixels = torch.randn(batch * TILES, 3, side, side, generator=torch.Generator().manual_seed(0))
    return ({"input_ids": torch.tensor([row] * batch), "pixel_values": pixels}, TILES * tile_tokens(model),
            f"an image of 2x2 tiles of {side}x{side} and its thumbnail (budgets per tile)", {}, tile_tokens(model))


def prompt(model: nn.Module, inputs: dict, before: bool, timed: Callable):
    """(vision seconds, prefill keywords, positions of decode step i) for the model as it is now."""
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    if before:   # vision tower + pixel shuffle + projector + reducer + compaction
        seconds, compacted = timed(lambda: before_lm.prepare(model, ids, dict(inputs, attention_mask=mask), True))
        ids, extra = compacted.input_ids, compacted.model_inputs
    else:
        seconds, image = timed(lambda: model.model.get_image_features(inputs["pixel_values"], return_dict=True))
        extra = dict(attention_mask=mask, mm_encoder_outputs={"image": image})
    length = ids.shape[1]
    return (seconds, dict(input_ids=ids, **extra),
            lambda step: torch.full((ids.shape[0], 1), length + step, device=ids.device))
