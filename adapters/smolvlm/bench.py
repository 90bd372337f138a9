"""SmolVLM / Idefics3: the prompts of ``vtr bench`` (``vtr.tools.bench_vlm``): ``workload`` builds batch copies of
text around one image split as the processor splits it (2 x 2 tiles and the global view, each after its marker)
with random pixels; ``prompt`` gives what the language model's prefill reads for the model as it is now (reduced
before the LM: the adapter's ``prepare``, timed with ``timed``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..vlm.bench import text_ids
from . import before_lm
from .common import tile_tokens

TILES = 2 * 2 + 1   # a 2 x 2 split and the global view


def workload(model: nn.Module, text: int, batch: int, image_size: Optional[int], video_frames: int,
             frames: Optional[str]) -> tuple[dict, int, str, dict, int]:
    """(inputs, visual tokens per prompt, description, extra ``vtr.patch`` keywords, tokens a budget covers: one
    tile's) of ``batch`` copies of one prompt."""
    config = model.config
    side = config.vision_config.image_size
    if video_frames:
        raise ValueError("the SmolVLM benchmark takes images only: leave out --video-frames")
    if image_size not in (None, side):
        raise ValueError(f"this SmolVLM takes {side}x{side} tiles (its tower's size), got {image_size}")
    image = config.image_token_id
    ids = text_ids(max(text - 2, 0) + 2 * TILES, min(image, config.text_config.vocab_size))
    markers, ids = ids[-2 * TILES:], ids[:max(text - 2, 0)]   # <fake_token_around_image> <row_r_col_c> of each tile
    middle = []
    for tile in range(TILES):
        middle += markers[2 * tile:2 * tile + 2] + [image] * tile_tokens(model)
    row = ids[:text // 2] + middle + ids[text // 2:]
    pixels = torch.randn(batch, TILES, 3, side, side, generator=torch.Generator().manual_seed(0))
    return ({"input_ids": torch.tensor([row] * batch), "pixel_values": pixels}, TILES * tile_tokens(model),
            f"an image of 2x2 tiles of {side}x{side} and its global view (budgets per tile)", {}, tile_tokens(model))


def prompt(model: nn.Module, inputs: dict, before: bool, timed: Callable):
    """(vision seconds, prefill keywords, positions of decode step i) for the model as it is now."""
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    if before:   # vision tower + pixel shuffle + reducer + compaction
        seconds, compacted = timed(lambda: before_lm.prepare(model, ids, dict(inputs, attention_mask=mask), True))
        ids, extra = compacted.input_ids, compacted.model_inputs
    else:
        seconds, image = timed(lambda: model.model.get_image_features(inputs["pixel_values"], return_dict=True))
        extra = dict(attention_mask=mask, mm_encoder_outputs={"image": image})
    length = ids.shape[1]
    return (seconds, dict(input_ids=ids, **extra),
            lambda step: torch.full((ids.shape[0], 1), length + step, device=ids.device))
