"""Qwen2-VL and Qwen2.5-VL: the prompts of ``vtr bench`` (``vtr.tools.bench_vlm``), as the family's own processor
would give them: ``workload`` builds batch copies of text around one image (or video) with random
pixels; ``prompt`` gives what the language model's prefill reads, for the model as it is now (unreduced: the
model's own encoder; reduced before the language model: the adapter's ``prepare``, timed with ``timed``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..vlm.bench import text_ids
from . import before_lm
from .common import timestamped_frames


def workload(model: nn.Module, text: int, batch: int, image_size: Optional[int], video_frames: int,
             frames: Optional[str]) -> tuple[dict, int, str, dict]:
    """(inputs, visual tokens per prompt, description, extra ``vtr.patch`` keywords) of ``batch`` copies of one
    prompt: ``text`` text tokens around one image of ``image_size`` or a ``video_frames``-frame video of that side."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    half = text // 2
    vision_config = config.vision_config
    patch_size, merge, temporal = (vision_config.patch_size, vision_config.spatial_merge_size,
                                   vision_config.temporal_patch_size)
    side = image_size or (224 if video_frames else 448)
    if side % (patch_size * merge):
        raise ValueError(f"a Qwen-VL image side is a multiple of {patch_size * merge} (patch {patch_size} x merge "
                         f"{merge}), got {side}")
    kind = "video" if video_frames else "image"
    grid = (max(video_frames // temporal, 1) if video_frames else 1, side // patch_size, side // patch_size)
    visual = grid[0] * (grid[1] // merge) * (grid[2] // merge)
    special = (config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)
    ids = text_ids(max(text - 2, 0), min(*special, config.text_config.vocab_size))
    token = config.image_token_id if kind == "image" else config.video_token_id
    # Qwen3-VL gives each temporal patch its own <t seconds> <vision_start> tokens <vision_end> (a text id as <t>).
    spans = grid[0] if kind == "video" and timestamped_frames(model) else 1
    stamps = text_ids(spans, min(*special, config.text_config.vocab_size)) if spans > 1 else []
    middle = []
    for span in range(spans):
        middle += stamps[span:span + 1] + [config.vision_start_token_id] + [token] * (visual // spans) + \
            [config.vision_end_token_id]
    row = ids[:half] + middle + ids[half:]
    input_ids = torch.tensor([row] * batch)
    pixels = torch.randn(batch * grid[0] * grid[1] * grid[2], 3 * temporal * patch_size ** 2, generator=generator)
    shown = (f"a {side}x{side} image" if kind == "image" else
             f"a {video_frames}-frame video of {side}x{side} ({grid[0]} temporal patches)")
    return ({"input_ids": input_ids,
                     "mm_token_type_ids": (input_ids == config.image_token_id).long()
                     + 2 * (input_ids == config.video_token_id).long(),
                     "pixel_values" if kind == "image" else "pixel_values_videos": pixels,
                     f"{kind}_grid_thw": torch.tensor([grid] * batch)},
            visual, shown, {"frames": frames} if video_frames and frames else {})


def prompt(model: nn.Module, inputs: dict, before: bool, timed: Callable):
    """(vision seconds, prefill keywords, positions of decode step i) for the model as it is now."""
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    mask = torch.ones_like(ids)
    vision = {k: v for k, v in inputs.items() if k.startswith(("pixel", "image_grid", "video_grid"))}
    if before:   # vision tower + reducer + compaction + M-RoPE positions
        prepare = lambda: before_lm.prepare(model, ids, mask, types, None, left=True, **vision)  # noqa: E731
        seconds, prepared = timed(prepare)
        ids, mask, positions = prepared.input_ids, prepared.attention_mask, prepared.position_ids
        outputs, types = prepared.encoder_outputs, prepared.mm_token_type_ids
    else:
        def encode() -> dict:
            outputs = {}
            if "pixel_values" in vision:
                outputs["image"] = model.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"],
                                                                  return_dict=True)
            if "pixel_values_videos" in vision:
                outputs["video"] = model.model.get_video_features(vision["pixel_values_videos"],
                                                                  vision["video_grid_thw"], return_dict=True)
            return outputs
        seconds, outputs = timed(encode)
        rope, _ = model.model.get_rope_index(ids, types, image_grid_thw=inputs.get("image_grid_thw"),
                                             video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)
        text = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        positions = torch.cat([text[None], rope])
    last = positions.amax(dim=(0, 2))   # each decode step is one past the prompt's last position
    return (seconds, dict(input_ids=ids, attention_mask=mask, position_ids=positions, mm_token_type_ids=types,
                          mm_encoder_outputs=outputs),
            lambda step: (last + 1 + step).view(1, -1, 1).expand(4, -1, -1))
