"""SmolVLM / Idefics3 reduction before the language model: each tile keeps ``budget`` tokens; ``generate()``
unchanged.

Where: on the connector's output (the tower's patches pixel-shuffled into ``s x s`` blocks and projected: the very
tokens the language model reads), once per tile, the global view included, with any vtr reducer. The prompt is
compacted as for LLaVA (``vtr.adapters.vlm.prompt``): each tile keeps as many placeholders as it kept tokens, at
the start of its own span, so ``<row_r_col_c>`` (and ``<global-img>``) still stand right before the tokens of
their tile; the reduced features go in through ``mm_encoder_outputs``, one tensor per prompt row as the model's
own ``get_image_features`` gives them; positions are the compacted prompt's own (1-D).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from vtr.core import run as runs
from vtr.core.plan import Reduction

from ..vlm import calls
from ..vlm.calls import Compacted, Family
from ..vlm.items import compact_items, reduce_items, report_fields, split_items
from ..vlm.language import prefill_macs
from ..vlm.prompt import item_queries, pad_id
from ..vlm.run import opened
from . import received
from .common import VISION_ARGUMENTS, WHERE, SmolVLMReport, cost, tile_grid, tile_tokens


def prepare(model: nn.Module, input_ids: Optional[Tensor], inputs: dict, left: bool) -> Compacted:
    """Encode the tiles, reduce each, compact the prompt, record the report (in this call's run)."""
    if input_ids is None:
        raise ValueError("a vtr-patched SmolVLM / Idefics3 needs input_ids with pixel values: the tiles are found "
                         "from config.image_token_id in input_ids (inputs_embeds are not supported)")
    image = model.config.image_token_id
    attention_mask = inputs.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    reduction: Reduction = model._vtr
    placeholder = input_ids == image
    per_tile = tile_tokens(model)
    with opened(model) as run:
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"),
                                                 return_dict=True)
        tiles = [tile for row in encoded.pooler_output if len(row) for tile in row.split(per_tile)]
        items = split_items(tiles, [tile_grid(model)] * len(tiles), placeholder, "image")
        queries = item_queries(model, reduction.reducer, items, input_ids, attention_mask, placeholder, run.query)
        scores, tower_macs = received.per_tile(model, run, len(tiles))
        reduced, reducer_macs = reduce_items(reduction, items, queries, cost(model, reduction.metric), scores)
        reducer_macs += tower_macs   # the attention each token receives: a pass the tower's fused kernel skips
        ids, mask, kept_positions = compact_items(input_ids, attention_mask, {"image": placeholder}, items, reduced,
                                                  pad_id(model, image), left)
        # One tensor per prompt row (its tiles' kept tokens), as get_image_features gives them: generate() splits
        # them by row to repeat them for beams.
        by_row = [[r.features for item, r in zip(items, reduced) if item.row == row] for row in range(len(ids))]
        encoded.pooler_output = [torch.cat(own) if own else tiles[0].new_zeros(0, tiles[0].shape[1])
                                 for own in by_row]
        runs.record(reduction, SmolVLMReport(
            visual_tokens_before=placeholder.sum(1), visual_tokens_after=(ids == image).sum(1),
            kept_positions=kept_positions, prefill_macs=prefill_macs(model, mask.sum(1)),
            prefill_macs_unreduced=prefill_macs(model, attention_mask.sum(1)), reducer_macs=reducer_macs,
            **report_fields(items, reduced)))
        return Compacted(ids, kept_positions, dict(attention_mask=mask.to(attention_mask.dtype),
                                                   mm_encoder_outputs={"image": encoded}))


FAMILY = Family(prepare, (*VISION_ARGUMENTS, "attention_mask"), SmolVLMReport, WHERE, "SmolVLM / Idefics3")


def generate(model: nn.Module, generate_fn: Callable, inputs: Optional[Tensor], *args, **kwargs):
    """``generate()`` on the compacted prompt with the reduced features; the caller's prompt, then the new tokens."""
    return calls.generate(model, FAMILY, generate_fn, inputs, *args, **kwargs)


def forward(model: nn.Module, original_forward: Callable, arguments: dict):
    """The model's forward; with pixel values it runs on the compacted prompt (``vtr.report(model).kept_positions``
    maps its logits back to the caller's columns)."""
    return calls.forward(model, FAMILY, original_forward, arguments)
