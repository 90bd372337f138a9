"""Tiny random InternVL models (transformers' format) and prompts for the InternVL tests (CPU, well under a second).

Each tile is 64 px: 8 x 8 patches of 8, pixel-shuffled 2 x 2 into 16 tokens (a 4 x 4 grid). An image of ``k``
tiles (its dynamic tiles, then the thumbnail when there are several) is written as the processor writes it:
``<img>``, ``16 k`` placeholders, ``</img>``.
"""
from __future__ import annotations

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

IMAGE, START, END, PAD = 95, 96, 97, 0
TOKENS = 16


def tiny_internvl(attn: str = "sdpa", seed: int = 0) -> InternVLForConditionalGeneration:
    """InternVL: InternViT-style tower (2 layers, hidden 32, CLS dropped), Qwen2 LM (hidden 64, 3 layers)."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=[64, 64], patch_size=[8, 8])
    text = dict(model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=None, eos_token_id=None)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=TOKENS,
                            downsample_ratio=0.5)
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration._from_config(config, attn_implementation=attn).eval()


ROWS = [[1, 5, 5, 6, 7], [1, 5, 6, 9, 1, 7, 3, 8], [1, 20, 21, 22, 23]]
IMAGES = {0: [5], 1: [1, 3]}   # per row: the tiles of each of its images (5: 2 x 2 and the thumbnail; 1: one tile)


def inputs(only: list = None, seed: int = 0) -> dict:
    """generate()/forward() keywords of three rows (an image of 5 tiles; an image of 1 and one of 3 tiles; text
    only), left-padded, or only the rows ``only`` (unpadded when one). Tile t of the whole batch has its own pixels."""
    chosen = [0, 1, 2] if only is None else only
    texts = {0: [[1, 5], [6, 7]], 1: [[1, 5, 6, 9], [7], [8]], 2: [[1, 20, 21, 22, 23]]}
    ids, pixels, index = [], [], 0
    for row in range(3):
        out = list(texts[row][0])
        for image, count in enumerate(IMAGES.get(row, [])):
            own = [torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(seed * 100 + index + t))
                   for t in range(count)]
            index += count
            out += [START] + [IMAGE] * (TOKENS * count) + [END] + texts[row][image + 1]
            if row in chosen:
                pixels += own
        if row in chosen:
            ids.append(out)
    width = max(map(len, ids))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    return {"input_ids": input_ids, "attention_mask": mask} | ({"pixel_values": torch.stack(pixels)} if pixels else {})


GENERATE = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)


def generate(model, kwargs: dict, **options):
    with torch.inference_mode():
        return model.generate(**kwargs, **{**GENERATE, **options})


def logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)
