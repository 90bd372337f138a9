"""InternVL reduction before the language model: each tile keeps ``budget`` tokens; ``generate()`` unchanged.

Where: on the projector's output (the tower's patches pixel-shuffled and projected: the very tokens the language
model reads), once per tile, the thumbnail included, with any vtr reducer. The prompt is compacted as for LLaVA
(``vtr.adapters.vlm.prompt``): each tile keeps as many placeholders as it kept tokens, in its own run, so the
image's tiles stay in order between ``<img>`` and ``</img>``; the reduced features go in through
``mm_encoder_outputs`` (``[tiles, kept, D]``, as the model's own ``get_image_features`` gives ``[tiles, n, D]``);
positions are the compacted prompt's own (1-D). With ``split="thumbnail"`` the budget is the image's, split over
its tiles by its thumbnail (``tiles``); tiles then keep different counts, and the features go in as one token per
entry (``[kept, 1, D]``), which transformers' beam expansion still splits by prompt row.
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
from . import tiles as thumbnail
from .common import VISION_ARGUMENTS, WHERE, InternVLReport, cost, tile_grid, tile_tokens


def prepare(model: nn.Module, input_ids: Optional[Tensor], inputs: dict, left: bool) -> Compacted:
    """Encode the tiles, reduce each, compact the prompt, record the report (in this call's run)."""
    if input_ids is None:
        raise ValueError("a vtr-patched InternVL needs input_ids with pixel values: the tiles are found from "
                         "config.image_token_id in input_ids (inputs_embeds are not supported)")
    image = model.config.image_token_id
    attention_mask = inputs.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    reduction: Reduction = model._vtr
    placeholder = input_ids == image
    with opened(model) as run:
        encoded = model.model.get_image_features(inputs["pixel_values"], return_dict=True)
        tiles = list(encoded.pooler_output)
        items = split_items(tiles, [tile_grid(model)] * len(tiles), placeholder, "image")
        queries = item_queries(model, reduction.reducer, items, input_ids, attention_mask, placeholder, run.query)
        cls_rows, tower_macs = received.per_tile(model, run, len(tiles))
        budgets, splits = None, None
        if getattr(reduction.visual, "split", None) == "thumbnail":   # the thumbnail's [CLS] row where it is kept
            budgets, splits = thumbnail.tile_budgets(reduction.visual.budget, items, inputs["pixel_values"],
                                                     tile_tokens(model), received=cls_rows)
        reduced, reducer_macs = reduce_items(reduction, items, queries, cost(model, reduction.metric),
                                             attention=cls_rows, budgets=budgets)
        reducer_macs += tower_macs   # the tower's [CLS] row: a pass its fused kernel skips
        ids, mask, kept_positions = compact_items(input_ids, attention_mask, {"image": placeholder}, items, reduced,
                                                  pad_id(model, image), left)
        # Tiles that keep one count: [tiles, kept, D], as the projector gives [tiles, n, D]; counts that differ
        # (split by the thumbnail): [kept, 1, D]. Either way generate() splits it by prompt row for beams.
        features = [r.features for r in reduced]
        encoded.pooler_output = (torch.stack(features) if len({len(f) for f in features}) == 1
                                 else torch.cat(features)[:, None])
        runs.record(reduction, InternVLReport(
            visual_tokens_before=placeholder.sum(1), visual_tokens_after=(ids == image).sum(1),
            kept_positions=kept_positions, prefill_macs=prefill_macs(model, mask.sum(1)),
            prefill_macs_unreduced=prefill_macs(model, attention_mask.sum(1)), reducer_macs=reducer_macs,
            tiles=splits, **report_fields(items, reduced)))
        return Compacted(ids, kept_positions, dict(attention_mask=mask.to(attention_mask.dtype),
                                                   mm_encoder_outputs={"image": encoded}))


FAMILY = Family(prepare, (*VISION_ARGUMENTS, "attention_mask"), InternVLReport, WHERE, "InternVL")


def generate(model: nn.Module, generate_fn: Callable, inputs: Optional[Tensor], *args, **kwargs):
    """``generate()`` on the compacted prompt with the reduced features; the caller's prompt, then the new tokens."""
    return calls.generate(model, FAMILY, generate_fn, inputs, *args, **kwargs)


def forward(model: nn.Module, original_forward: Callable, arguments: dict):
    """The model's forward; with pixel values it runs on the compacted prompt (``vtr.report(model).kept_positions``
    maps its logits back to the caller's columns)."""
    return calls.forward(model, FAMILY, original_forward, arguments)
