"""Tiny random LLaVA-OneVision and LLaVA-NeXT-Video models and prompts with videos and images (CPU, well under a
second)."""
from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
                          LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                          SiglipVisionConfig)

IMAGE, VIDEO, PAD = 97, 98, 0
PINPOINTS = [[56, 112], [112, 56], [112, 112]]
FRAMES = 4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14)
TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD, bos_token_id=None, eos_token_id=None)


def tiny_onevision(seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """SigLIP tower (4 x 4 patches) and a Qwen2 language model; a frame is 2 x 2 tokens, then one newline per video."""
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**VISION), text_config=Qwen2Config(**TEXT),
                                  image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def tiny_next_video(seed: int = 0) -> LlavaNextVideoForConditionalGeneration:
    """CLIP tower (4 x 4 patches) and a Llama language model; a frame is 2 x 2 tokens (average pooling, stride 2)."""
    config = LlavaNextVideoConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                                  image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS,
                                  spatial_pool_stride=2)
    torch.manual_seed(seed)
    return LlavaNextVideoForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def video_tokens(model) -> int:
    """Placeholders of one video: its frames' tokens (and OneVision's newline)."""
    newline = isinstance(model, LlavaOnevisionForConditionalGeneration)
    return FRAMES * 4 + newline


def image_tokens(model, size) -> int:
    pixels = torch.zeros(1, 5, 3, 56, 56)
    with torch.no_grad():
        return len(model.model.get_image_features(pixels, torch.tensor([size])).pooler_output[0])


def inputs(model, rows: list[list], seed: int = 0, only: list = None) -> dict:
    """Rows of ints (text) and ``"video"`` / ``("image", (h, w))`` items, left-padded (``only``: those rows alone,
    unpadded when one); pixels random per item, the same whichever rows are chosen."""
    chosen = list(range(len(rows))) if only is None else only
    ids, videos, images, sizes = [], [], [], []
    generator = torch.Generator().manual_seed(seed)
    per_item = []
    for row in rows:
        own = []
        for part in row:
            if part == "video":
                own.append(("video", torch.randn(FRAMES, 3, 56, 56, generator=generator)))
            elif isinstance(part, tuple):
                own.append(("image", torch.randn(5, 3, 56, 56, generator=generator), part[1]))
        per_item.append(own)
    for r in chosen:
        out, items = [], iter(per_item[r])
        for part in rows[r]:
            if part == "video":
                videos.append(next(items)[1])
                out += [VIDEO] * video_tokens(model)
            elif isinstance(part, tuple):
                _, pixels, size = next(items)
                images.append(pixels)
                sizes.append(size)
                out += [IMAGE] * image_tokens(model, size)
            else:
                out.append(part)
        ids.append(out)
    width = max(map(len, ids)) if len(chosen) > 1 else len(ids[0])
    result = {"input_ids": torch.tensor([[PAD] * (width - len(r)) + r for r in ids]),
              "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])}
    if videos:
        result["pixel_values_videos"] = torch.stack(videos)
    if images:
        result |= {"pixel_values": torch.stack(images), "image_sizes": torch.tensor(sizes)}
    return result


ROWS = [[1, 5, "video", 6, 7], [1, 5, 6, 9, "video", 8], [1, 5, ("image", (56, 100)), 7], [1, 20, 21]]
VIDEO_ROWS = ROWS[:2]
