"""Tiny random Qwen3-VL models and prompts for the Qwen3-VL tests (CPU, well under a second).

A video is laid out as Qwen3-VL's processor lays it out: each temporal patch (two frames) is its own
``<t seconds> <vision_start> tokens <vision_end>``, the timestamp a text token between the frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

IMAGE, VIDEO, START, END, PAD = 90, 91, 92, 93, 0
SECONDS = 60      # timestamp tokens: SECONDS + k before the video's k-th frame
PATCH, MERGE, TEMPORAL = 16, 2, 2
PATCH_VALUES = 3 * TEMPORAL * PATCH * PATCH
DEEPSTACK = [0, 1]   # tower layers whose features DeepStack adds after language-model layers 0 and 1


def tiny_qwen3(attn: str = "sdpa", seed: int = 0, layers: int = 4) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL: text hidden 64 (``layers`` layers, q/k norms, interleaved M-RoPE 2/3/3), vision depth 3, hidden 32,
    patch 16, 2x2 merger, DeepStack from tower layers 0 and 1."""
    text = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, num_position_embeddings=64,
                  deepstack_visual_indexes=DEEPSTACK)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration._from_config(config, attn_implementation=attn).eval()


def tokens(grid: tuple) -> int:
    t, h, w = grid
    return t * (h // MERGE) * (w // MERGE)


@dataclass
class Batch:
    """A left-padded prompt batch with its images and videos, as Qwen3-VL's processor would give it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_grids: list = field(default_factory=list)
    video_grids: list = field(default_factory=list)
    rows: list = field(default_factory=list)          # per row: its (kind, index) items, in order
    seed: int = 0

    def inputs(self, rows: Optional[list] = None) -> dict:
        """generate()/forward() keywords for the whole batch, or only ``rows`` (unpadded when one row)."""
        chosen = list(range(self.input_ids.shape[0])) if rows is None else rows
        ids, mask = self.input_ids[chosen], self.attention_mask[chosen]
        if len(chosen) == 1:
            real = mask[0].bool()
            ids, mask = ids[:, real], mask[:, real]
        kwargs = {"input_ids": ids, "attention_mask": mask,
                  "mm_token_type_ids": (ids == IMAGE).long() + 2 * (ids == VIDEO).long()}
        for kind, grids in (("image", self.image_grids), ("video", self.video_grids)):
            wanted = [index for row in chosen for k, index in self.rows[row] if k == kind]
            if wanted:
                kwargs["pixel_values" if kind == "image" else "pixel_values_videos"] = torch.cat(
                    [self.pixels(kind, i) for i in wanted])
                kwargs[f"{kind}_grid_thw"] = torch.tensor([grids[i] for i in wanted])
        return kwargs

    def pixels(self, kind: str, index: int) -> torch.Tensor:
        grid = (self.image_grids if kind == "image" else self.video_grids)[index]
        seed = self.seed * 1000 + (0 if kind == "image" else 500) + index
        return torch.randn(grid[0] * grid[1] * grid[2], PATCH_VALUES, generator=torch.Generator().manual_seed(seed))


def batch(rows: list[list], image_grids: list = (), video_grids: list = (), seed: int = 0) -> Batch:
    """Rows of ints (text) and ``("image", i)`` / ``("video", i)`` items; left-padded."""
    ids, items = [], []
    for row in rows:
        out, own = [], []
        for part in row:
            if isinstance(part, tuple):
                kind, index = part
                grid = (image_grids if kind == "image" else video_grids)[index]
                if kind == "image":
                    out += [START] + [IMAGE] * tokens(grid) + [END]
                else:
                    for frame in range(grid[0]):
                        out += [SECONDS + frame, START] + [VIDEO] * tokens((1, *grid[1:])) + [END]
                own.append(part)
            else:
                out.append(part)
        ids.append(out)
        items.append(own)
    width = max(map(len, ids))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    return Batch(input_ids, mask, list(image_grids), list(video_grids), items, seed)


def mixed_batch(seed: int = 0) -> Batch:
    """Three rows: images of 16 and 6 tokens; a video of 3 frames of 2 x 2 tokens and an image of 9; text only."""
    return batch([[1, 5, ("image", 0), 6, ("image", 1), 7, 8],
                  [1, 5, ("video", 0), 9, ("image", 2), 7, 12],
                  [1, 20, 21, 22, 23]],
                 image_grids=[(1, 8, 8), (1, 4, 6), (1, 6, 6)], video_grids=[(3, 4, 4)], seed=seed)


GENERATE = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)


def generate(model, inputs: dict, **kwargs):
    with torch.inference_mode():
        return model.generate(**inputs, **{**GENERATE, **kwargs})


def logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)
