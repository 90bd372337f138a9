"""Tiny random Qwen2.5-VL / Qwen2-VL models and prompts for the Qwen-VL adapter tests (CPU, well under a second)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

IMAGE, VIDEO, START, END, PAD = 90, 91, 92, 93, 0
PATCH, MERGE, TEMPORAL = 14, 2, 2
PATCH_VALUES = 3 * TEMPORAL * PATCH * PATCH    # one row of pixel_values: a 2 x 14 x 14 patch of 3 channels
TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def tiny_qwen(attn: str = "sdpa", seed: int = 0, depth: int = 2,
              full: tuple = (1,)) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: text hidden 64 (3 layers, M-RoPE sections 2/3/3), vision ``depth`` 2, hidden 32, 2x2 merger,
    window 56 (2 x 2 merged tokens per window) with the blocks ``full`` (block 1) on full attention."""
    vision = dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=56,
                  fullatt_block_indexes=list(full))
    config = Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn).eval()


def tiny_qwen2(attn: str = "sdpa", seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL: the same shapes, its own vision tower (no windows)."""
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    config = Qwen2VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration._from_config(config, attn_implementation=attn).eval()


def tokens(grid: tuple) -> int:
    """Visual tokens after the merger of an image or video of ``grid`` (t, h, w) patches."""
    t, h, w = grid
    return t * (h // MERGE) * (w // MERGE)


@dataclass
class Batch:
    """A left-padded prompt batch with its images (and videos), as the processor would give it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_grids: list = field(default_factory=list)   # per image (t, h, w), in prompt order
    video_grids: list = field(default_factory=list)
    rows: list = field(default_factory=list)          # per row: its (kind, index) items, in order
    seed: int = 0

    def inputs(self, rows: Optional[list] = None) -> dict:
        """generate()/forward() keywords for the whole batch, or only ``rows`` (unpadded when one row)."""
        ids, mask = self.input_ids, self.attention_mask
        chosen = list(range(ids.shape[0])) if rows is None else rows
        ids, mask = ids[chosen], mask[chosen]
        if len(chosen) == 1:
            real = mask[0].bool()
            ids, mask = ids[:, real], mask[:, real]
        kwargs = {"input_ids": ids, "attention_mask": mask,
                  "mm_token_type_ids": (ids == IMAGE).long() + 2 * (ids == VIDEO).long()}
        for kind, grids in (("image", self.image_grids), ("video", self.video_grids)):
            wanted = [index for row in chosen for k, index in self.rows[row] if k == kind]
            if wanted:
                pixels = [self.pixels(kind, i) for i in wanted]
                key = "pixel_values" if kind == "image" else "pixel_values_videos"
                kwargs[key] = torch.cat(pixels)
                kwargs[f"{kind}_grid_thw"] = torch.tensor([grids[i] for i in wanted])
        return kwargs

    def pixels(self, kind: str, index: int) -> torch.Tensor:
        grid = (self.image_grids if kind == "image" else self.video_grids)[index]
        seed = self.seed * 1000 + (0 if kind == "image" else 500) + index
        return torch.randn(grid[0] * grid[1] * grid[2], PATCH_VALUES, generator=torch.Generator().manual_seed(seed))


def batch(rows: list[list], image_grids: list = (), video_grids: list = (), seed: int = 0) -> Batch:
    """Rows given as lists of ints (text) and ``("image", i)`` / ``("video", i)`` items, which become
    ``<vision_start>``, the item's placeholders and ``<vision_end>``; left-padded."""
    ids, items = [], []
    for row in rows:
        out, own = [], []
        for part in row:
            if isinstance(part, tuple):
                kind, index = part
                grid = (image_grids if kind == "image" else video_grids)[index]
                out += [START] + [IMAGE if kind == "image" else VIDEO] * tokens(grid) + [END]
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
    """Three rows: two images of different sizes (16 and 6 tokens), one image of 9 tokens with more text,
    and text only."""
    return batch([[1, 5, ("image", 0), 6, ("image", 1), 7, 8],
                  [1, 5, 6, 9, 10, ("image", 2), 7, 12],
                  [1, 20, 21, 22, 23]],
                 image_grids=[(1, 8, 8), (1, 4, 6), (1, 6, 6)], seed=seed)


GENERATE = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)


def generate(model, inputs: dict, **kwargs):
    with torch.inference_mode():
        return model.generate(**inputs, **GENERATE, **kwargs)


def logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)   # [B, steps, vocab]; step 0 is the prefill's last position


class LanguageInputs:
    """Records what the language model receives at the prefill: position ids and input embeddings."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.keep, with_kwargs=True)

    def keep(self, module, args, kwargs):
        self.calls.append({"position_ids": kwargs.get("position_ids"), "inputs_embeds": kwargs.get("inputs_embeds")})

    def remove(self):
        self.handle.remove()


def causal(n: int) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)


def segment_reference(model, inputs: dict, stages: dict, generated: torch.Tensor) -> torch.Tensor:
    """The unpatched layers, no cache, one unpadded row: each stage's layer onwards runs on that stage's kept
    prompt columns plus the generated tokens, each with the M-RoPE position it has in the whole sequence
    (``get_rope_index`` on the prompt, then one past the prompt's largest per new token). Last-position logits."""
    inner, language = model.model, model.model.language_model
    ids = inputs["input_ids"]
    with torch.inference_mode():
        prompt, _ = inner.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                                         attention_mask=torch.ones_like(ids))
        new = torch.arange(len(generated)) + prompt.max() + 1
        positions = torch.cat([prompt, new.view(1, 1, -1).expand(3, 1, -1)], dim=2)
        sequence = torch.cat([ids, generated[None]], dim=1)
        hidden = language.embed_tokens(sequence)
        if "pixel_values" in inputs:
            features = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            hidden[sequence == IMAGE] = torch.cat(list(features))
        added = torch.arange(ids.shape[1], sequence.shape[1])
        present = torch.arange(sequence.shape[1])            # sequence column of each row of `hidden`
        for index, decoder in enumerate(language.layers):
            if index in stages:
                wanted = torch.cat([stages[index], added])
                hidden, present = hidden[:, torch.searchsorted(present, wanted)], wanted
            hidden = decoder(hidden, attention_mask=causal(hidden.shape[1]), position_ids=None,
                             position_embeddings=language.rotary_emb(hidden, positions[:, :, present]))
        return model.lm_head(language.norm(hidden[:, -1]))


def video_batch(seed: int = 0) -> Batch:
    """Two rows: a video of 4 frames of 2 x 2 tokens (16) and an image of 6; a video of 2 frames of 3 x 2 (12)."""
    return batch([[1, 5, ("video", 0), 6, ("image", 0), 7], [1, 9, 10, ("video", 1), 8]],
                 image_grids=[(1, 4, 6)], video_grids=[(4, 4, 4), (2, 6, 4)], seed=seed)


def with_frames(inputs: dict, order: list[int]) -> dict:
    """``inputs`` whose first video's frames are its frames ``order`` (e.g. [0, 0, 2, 2]: each shown twice)."""
    grid = inputs["video_grid_thw"][0].tolist()
    per_frame = grid[1] * grid[2]
    pixels = inputs["pixel_values_videos"].clone()
    first = pixels[:grid[0] * per_frame].view(grid[0], per_frame, -1)
    pixels[:grid[0] * per_frame] = first[order].reshape(-1, pixels.shape[1])
    return inputs | {"pixel_values_videos": pixels}
