"""Tiny random LLaVA-NeXT models and prompts for the AnyRes tests (CPU, well under a second each).

Placeholder counts come from the model's own ``get_image_features`` for the given image sizes,
never from a formula here.
"""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

import vtr

from llava_models import GENERATE, IMAGE_TOKEN, left_padded

PINPOINTS = [[56, 112], [112, 56], [112, 112]]   # (height, width): 1x2, 2x1 and 2x2 crops of 56 x 56
MAX_CROPS = 4


def tiny_llava_next(attn: str = "sdpa", seed: int = 0, **overrides) -> LlavaNextForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    text = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    settings = dict(image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                    vision_feature_select_strategy="default") | overrides
    config = LlavaNextConfig(vision_config=vision, text_config=text, **settings)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None     # random weights: never stop early, compare every step
    return model


def image_counts(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[int]:
    """Features per image, as the unpatched model packs them (what the processor expands <image> to)."""
    with torch.inference_mode():   # a patched model's own get_image_features: vtr does not change it
        features = model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
    return [len(f) for f in features.pooler_output]


def pixels(num_images: int, seed: int = 0) -> torch.Tensor:
    """``[I, 1 + MAX_CROPS, 3, 56, 56]``, as the processor pads them."""
    return torch.randn(num_images, 1 + MAX_CROPS, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def batch(model, rows: list[tuple[list[int], list[tuple[int, int]], list[int]]], seed: int = 0):
    """Left-padded ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_sizes`` for rows of
    (text before, image sizes, text after); each image gets its own placeholder count."""
    sizes = [size for _, row_sizes, _ in rows for size in row_sizes]
    image_sizes = torch.tensor(sizes, dtype=torch.long).view(-1, 2)
    pixel_values = pixels(len(sizes), seed)
    counts = iter(image_counts(model, pixel_values, image_sizes) if sizes else [])
    prompts = [before + [IMAGE_TOKEN] * sum(next(counts) for _ in row_sizes) + after
               for before, row_sizes, after in rows]
    ids, mask = left_padded(prompts)
    return ids, mask, pixel_values, image_sizes


_models: dict = {}


def model_for(attn: str = "sdpa"):
    """A fresh (unpatched) tiny model per test; built once per attention implementation."""
    if attn not in _models:
        _models[attn] = tiny_llava_next(attn)
    model = _models[attn]
    if vtr.is_patched(model):
        vtr.unpatch(model)
    return model


def run(model, ids, mask, pixel_values, image_sizes, **kwargs):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes,
                              **(GENERATE | kwargs))
