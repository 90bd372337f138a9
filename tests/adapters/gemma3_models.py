"""Tiny random Gemma 3 models and prompts for the Gemma 3 tests (CPU, well under a second).

Each 64 px image is 8 x 8 SigLIP patches of 8 px, average-pooled 2 x 2 to 16 tokens (a 4 x 4 grid), which the
prompt holds as ``<start_of_image>``, 16 image tokens, ``<end_of_image>``.
"""
from __future__ import annotations

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

IMAGE, BOI, EOI, PAD = 95, 96, 97, 0
TOKENS = 16


def tiny_gemma3(attn: str = "sdpa", seed: int = 0) -> Gemma3ForConditionalGeneration:
    """Gemma 3: text hidden 64, 4 layers (sliding window 8, full attention at layer 3), vision 2 layers, hidden 32."""
    text = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=8, pad_token_id=PAD, bos_token_id=None,
                eos_token_id=None, layer_types=["sliding_attention"] * 3 + ["full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS, image_token_id=IMAGE,
                          boi_token_id=BOI, eoi_token_id=EOI)
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration._from_config(config, attn_implementation=attn).eval()


ROWS = [[1, 5, "image", 6, "image", 7, 8], [1, 5, 6, 9, 10, "image", 7, 12], [1, 20, 21, 22, 23]]


def inputs(rows: list = ROWS, only: list = None, seed: int = 0) -> dict:
    """generate()/forward() keywords of ``rows`` (ints: text; "image": one image), left-padded, or only the rows
    ``only`` (unpadded when one); image i of the whole batch has its own random pixels."""
    ids, pixels, index = [], [], 0
    chosen = range(len(rows)) if only is None else only
    for r, row in enumerate(rows):
        out = []
        for part in row:
            if part == "image":
                if r in chosen:
                    pixels.append(torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(seed * 100 + index)))
                index += 1
                out += [BOI] + [IMAGE] * TOKENS + [EOI]
            else:
                out.append(part)
        if r in chosen:
            ids.append(out)
    width = max(map(len, ids))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    kwargs = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": (input_ids == IMAGE).long()}
    return kwargs | ({"pixel_values": torch.stack(pixels)} if pixels else {})


GENERATE = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)


def generate(model, kwargs: dict, **options):
    with torch.inference_mode():
        return model.generate(**kwargs, **{**GENERATE, **options})


def logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)


def tiny_gemma3_layers(layer_types: list, attn: str = "sdpa", seed: int = 0) -> Gemma3ForConditionalGeneration:
    """:func:`tiny_gemma3` with its own ``layer_types`` (one per decoder layer): where in-LLM pruning's stage layers
    and the layers after them are local (sliding window 8) or global."""
    model = tiny_gemma3(attn, seed)
    config = model.config
    config.text_config.layer_types = list(layer_types)
    config.text_config.num_hidden_layers = len(layer_types)
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
