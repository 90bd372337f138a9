"""Tiny random LLaVA models and prompts for the LLaVA adapter tests (CPU, well under a second each)."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 99
PAD = 0
IMAGE_TOKENS = 16   # (56 / 14)^2


def tiny_llava(attn: str = "sdpa", strategy: str = "default", seed: int = 0) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    text = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=IMAGE_TOKENS + (strategy == "full"), vision_feature_layer=-2,
                         vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn)
    return model.eval()


def prompt_row(text_before: list[int], images: int, text_after: list[int], per_image: int = IMAGE_TOKENS) -> list[int]:
    return text_before + [IMAGE_TOKEN] * (per_image * images) + text_after


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def mixed_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with two images, one image (longer text) and no image: kept counts differ per row."""
    rows = [
        prompt_row([1, 5], 2, [7, 8]),
        prompt_row([1, 5, 6, 9, 10, 11], 1, [7, 12, 13]),
        [1, 20, 21, 22, 23],
    ]
    ids, mask = left_padded(rows)
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    return ids, mask, pixels
