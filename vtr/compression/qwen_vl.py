"""Adaptive granularity on Qwen2-VL and Qwen2.5-VL (transformers' ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration``): each image's merged tokens (its own grid, any size) are pooled at the level
its router picks for the image and its row's question.

The prompt is compacted as vtr's Qwen-VL adapter compacts it (``vtr.adapters.qwen_vl.before_lm``): each image keeps
as many placeholders as tokens, and every kept token keeps the M-RoPE position of its window's first token in the
caller's prompt (text keeps its own), so positions stay the model's own integers. Images only (videos refused).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from vtr.adapters.base import Swapped
from vtr.adapters.errors import UnsupportedModelError
from vtr.adapters.vlm.items import Reduced, compact_items
from vtr.adapters.vlm.prompt import pad_id, row_queries

from .granularity import pool_level, windows
from .llava import Encoded, granularity_module
from .module import CompressedModel, CompressionReport, attach, compression_of, record


def check(model: nn.Module) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    if not isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)):
        raise UnsupportedModelError(f"vtr.compress's granularity takes Qwen2-VL and Qwen2.5-VL of the Qwen-VL family "
                                    f"so far, got {type(model).__name__}")


def granularity(model: nn.Module, levels: Sequence[int] = (1, 2, 4), router: str = "relevance",
                tolerance: float = 0.25, temperature: float = 1.0) -> None:
    compression = granularity_module(model.config.text_config.hidden_size, None, levels, router, tolerance,
                                     temperature)
    compression.family = "qwen_vl"
    attach(model, compression, CompressedQwenVL)


def tokenpacker(model: nn.Module, scale: int = 2, layers: Optional[Sequence[int]] = None,
                width: Optional[int] = None, heads: Optional[int] = None) -> None:
    raise UnsupportedModelError("tokenpacker replaces a LLaVA-format projector; Qwen-VL's patch merger is not one "
                                "(use vtr.compress(model, 'granularity') there)")


def _grids(model: nn.Module, image_grid_thw: Tensor) -> list[tuple[int, int]]:
    merge = int(model.config.vision_config.spatial_merge_size)
    out = []
    for t, h, w in image_grid_thw.tolist():
        if t != 1:
            raise ValueError(f"granularity on Qwen-VL takes images (one temporal patch), got a grid of {t} x {h} x {w}")
        out.append((h // merge, w // merge))
    return out


def encode(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
           image_grid_thw: Tensor) -> tuple[Encoded, list]:
    """The images' merged tokens, each row's question, and the items (``vtr.adapters.vlm.items.Visual``)."""
    from vtr.adapters.qwen_vl.common import merge_size, visuals

    compression = compression_of(model)
    outputs = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    placeholder = input_ids == model.config.image_token_id
    items = visuals(list(outputs.pooler_output), image_grid_thw, placeholder, "image", merge_size(model))
    rows = torch.tensor([item.row for item in items], dtype=torch.long, device=input_ids.device)
    questions = None
    if compression.routes:
        questions = row_queries(model, input_ids, attention_mask, placeholder, rows, None)
    counts = torch.tensor([item.num_tokens for item in items], dtype=torch.long)
    return Encoded([item.features for item in items], questions, counts, rows, outputs,
                   _grids(model, image_grid_thw)), items


def pooled(tokens: Tensor, grid: tuple[int, int], factor: int) -> Reduced:
    """One image pooled at ``factor`` as the items pipeline describes a reduction (each window's representative:
    its first token in raster order, the top-left)."""
    window = windows(grid, factor).to(tokens.device)
    count = torch.bincount(window)
    first = torch.full((len(count),), len(window), dtype=torch.long, device=tokens.device)
    first = first.scatter_reduce(0, window, torch.arange(len(window), device=tokens.device), "amin")
    kept = pool_level(tokens, grid, factor)
    return Reduced(kept, window, count.to(tokens.dtype), first, [len(window), len(count)])


def prepare(model: nn.Module, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], pixel_values: Tensor,
            image_grid_thw: Optional[Tensor], mm_token_type_ids: Optional[Tensor], left: bool) -> tuple[Tensor, dict,
                                                                                                         Tensor]:
    from vtr.adapters.qwen_vl.before_lm import _kept_positions
    from vtr.adapters.qwen_vl.common import prompt_positions, token_types

    if input_ids is None or image_grid_thw is None:
        raise ValueError("a vtr-compressed Qwen-VL needs input_ids and image_grid_thw with pixel_values")
    config = model.config
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    types = token_types(input_ids, mm_token_type_ids, config.image_token_id, config.video_token_id)
    compression = compression_of(model)
    encoded, items = encode(model, input_ids, attention_mask, pixel_values, image_grid_thw)
    reduced, levels = [], []
    for index, (tokens, grid) in enumerate(zip(encoded.features, encoded.grids)):
        with torch.no_grad():
            factor = compression.levels[compression.choose(tokens.detach(), encoded.questions[index][0].detach(),
                                                           grid)]
        reduced.append(pooled(tokens, grid, factor))
        levels.append(factor)
    image_placeholder = input_ids == config.image_token_id
    ids, mask, kept_positions = compact_items(
        input_ids, attention_mask, {"image": image_placeholder, "video": input_ids == config.video_token_id}, items,
        reduced, pad_id(model, config.image_token_id, config.video_token_id), left, by_span=True)
    full = prompt_positions(model, input_ids, attention_mask, types, image_grid_thw, None, None)
    positions = _kept_positions(full, input_ids.shape[1], items, reduced, kept_positions)
    text = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
    model.model.rope_deltas = positions.amax(dim=(0, 2))[:, None] + 1 - mask.sum(1, keepdim=True)
    encoded.outputs.pooler_output = [r.features for r in reduced]
    kept = torch.tensor([len(r.features) for r in reduced])
    record(compression, CompressionReport(compression.method, encoded.rows.cpu(), torch.tensor(levels),
                                          encoded.counts, kept, kept_positions.cpu()))
    new_types = types.gather(1, kept_positions.clamp_min(0)).masked_fill(kept_positions < 0, 0)
    return ids, {"attention_mask": mask.to(attention_mask.dtype), "position_ids": torch.cat([text[None], positions]),
                 "mm_token_type_ids": new_types, "mm_encoder_outputs": {"image": encoded.outputs}}, kept_positions


def router_inputs(model: nn.Module, batch: dict) -> tuple[list, Tensor]:
    """Per image (tokens, question, grid), and each image's row, for training the router."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    encoded, _ = encode(model, batch["input_ids"], mask, batch["pixel_values"], batch["image_grid_thw"])
    return list(zip(encoded.features, [q[0] for q in encoded.questions], encoded.grids)), encoded.rows


_OWN = ("image_grid_thw", "mm_token_type_ids")


class CompressedQwenVL(CompressedModel, Swapped):
    """Mixed in front of the model's class: calls with images run on the compacted prompt."""

    family = "Qwen-VL"

    def refuse_arguments(self, arguments: dict) -> None:
        _refuse_videos(arguments)

    def prepare_images(self, input_ids: Optional[Tensor], arguments: dict, left: bool) -> tuple[Tensor, dict, Tensor]:
        return prepare(self, input_ids, arguments.pop("attention_mask", None), arguments.pop("pixel_values"),
                       arguments.pop("image_grid_thw", None), arguments.pop("mm_token_type_ids", None), left)


def _refuse_videos(arguments: dict) -> None:
    if arguments.get("pixel_values_videos") is not None:
        raise UnsupportedModelError("granularity on Qwen-VL takes images only so far (pixel_values_videos given)")
