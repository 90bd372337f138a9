"""Tiny random SmolVLM / Idefics3 models and prompts for their tests (CPU, well under a second).

Each tile is 64 px: 8 x 8 patches of 8, pixel-shuffled 2 x 2 into 16 tokens (a 4 x 4 grid). An image split into
``rows x cols`` tiles is written as the processor writes it: ``<fake> <row_r_col_c> <image>*16`` per tile, a newline
after each row of tiles, then ``<fake> <global-img> <image>*16 <fake>``; marker and newline ids are ordinary text
ids here (the real ones are the tokenizer's).
"""
from __future__ import annotations

import torch
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig,
                          SmolVLMForConditionalGeneration)

IMAGE, FAKE, GLOBAL, NEWLINE, PAD = 95, 96, 97, 98, 0
TOKENS = 16
TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD, bos_token_id=None, eos_token_id=None)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
              patch_size=8)


def tiny_smolvlm(attn: str = "sdpa", seed: int = 0) -> SmolVLMForConditionalGeneration:
    config = SmolVLMConfig(text_config=TEXT, vision_config=VISION, scale_factor=2, image_token_id=IMAGE)
    torch.manual_seed(seed)
    return SmolVLMForConditionalGeneration._from_config(config, attn_implementation=attn).eval()


def tiny_idefics3(attn: str = "sdpa", seed: int = 0) -> Idefics3ForConditionalGeneration:
    config = Idefics3Config(text_config=TEXT, vision_config=VISION, scale_factor=2, image_token_id=IMAGE)
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration._from_config(config, attn_implementation=attn).eval()


def image_prompt(rows: int, cols: int) -> list[int]:
    """The placeholders of one image split into ``rows x cols`` tiles (0 x 0: not split), with the global view."""
    out = []
    for r in range(rows):
        for c in range(cols):
            out += [FAKE, 10 + 10 * r + c] + [IMAGE] * TOKENS     # <row_{r+1}_col_{c+1}>: text id 10 + 10r + c
        out.append(NEWLINE)
    return out + ([NEWLINE] if rows else []) + [FAKE, GLOBAL] + [IMAGE] * TOKENS + [FAKE]


ROWS = [[1, 5, (2, 2), 6, 7], [1, 5, 6, 9, (0, 0), 7, (1, 2), 8], [1, 20, 21, 22, 23]]   # tiles: 5, then 1 + 3, none


def tiles(part: tuple) -> int:
    return part[0] * part[1] + 1


def inputs(rows: list = ROWS, only: list = None, seed: int = 0) -> dict:
    """generate()/forward() keywords of ``rows`` (ints: text; ``(rows, cols)``: an image split so), left-padded,
    or only the rows ``only`` (unpadded when one). ``pixel_values`` ``[B, most tiles, 3, 64, 64]``, zero-padded as
    the processor pads it; tile t of the whole batch has its own random pixels."""
    chosen = list(range(len(rows))) if only is None else only
    ids, per_row, index = [], [], 0
    for r, row in enumerate(rows):
        out, own = [], []
        for part in row:
            if isinstance(part, tuple):
                for _ in range(tiles(part)):
                    own.append(torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(seed * 100 + index)))
                    index += 1
                out += image_prompt(*part)
            else:
                out.append(part)
        if r in chosen:
            ids.append(out)
            per_row.append(own)
    width = max(map(len, ids))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    kwargs = {"input_ids": input_ids, "attention_mask": mask}
    most = max(len(own) for own in per_row)
    if most:
        pixels = torch.zeros(len(per_row), most, 3, 64, 64)
        for r, own in enumerate(per_row):
            if own:
                pixels[r, :len(own)] = torch.stack(own)
        kwargs["pixel_values"] = pixels
    return kwargs


GENERATE = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)


def generate(model, kwargs: dict, **options):
    with torch.inference_mode():
        return model.generate(**kwargs, **{**GENERATE, **options})


def logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)
