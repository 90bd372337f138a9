"""Gemma 3 reduction before the language model: each image keeps ``budget`` of its pooled tokens; ``generate()``
unchanged.

Where: on the projector's output (SigLIP tokens average-pooled to ``mm_tokens_per_image``, the very tokens the
language model reads), once per image, with any vtr reducer (``pool`` pools the pooled grid again by its factor).
The prompt is compacted as for LLaVA (``vtr.adapters.vlm.prompt``): each image keeps as many placeholders as it
kept tokens, padding is rebuilt, the reduced features go in through ``mm_encoder_outputs``, and positions are
the compacted prompt's own (Gemma 3 has 1-D rotary positions, which ``generate()`` numbers from the mask).

The bidirectional image attention survives: the compacted prompt's ``token_type_ids`` are the caller's at the
kept columns, so each image's kept tokens form one run of type 1 between its ``<start_of_image>`` and
``<end_of_image>``, and the mask Gemma 3 builds from them lets every kept token of an image see every other one
(earlier and later), while text stays causal.
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
from .common import VISION_ARGUMENTS, WHERE, Gemma3Report, cost, image_grid, token_types


def prepare(model: nn.Module, input_ids: Optional[Tensor], inputs: dict, left: bool) -> Compacted:
    """Encode the images, reduce each, compact the prompt (and its token types), record the report."""
    if input_ids is None:
        raise ValueError("a vtr-patched Gemma 3 needs input_ids with pixel values: the image span is found from "
                         "config.image_token_id in input_ids (inputs_embeds are not supported)")
    image = model.config.image_token_id
    types = token_types(input_ids, inputs.get("token_type_ids"), image)
    attention_mask = inputs.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    reduction: Reduction = model._vtr
    placeholder = input_ids == image
    with opened(model) as run:
        encoded = model.model.get_image_features(inputs["pixel_values"], return_dict=True)
        features = list(encoded.pooler_output)
        items = split_items(features, [image_grid(model)] * len(features), placeholder, "image")
        queries = item_queries(model, reduction.reducer, items, input_ids, attention_mask, placeholder, run.query)
        scores, tower_macs = received.per_image(model, run, len(features))
        reduced, reducer_macs = reduce_items(reduction, items, queries, cost(model, reduction.metric), scores)
        reducer_macs += tower_macs   # the attention each token receives: a pass the tower's fused kernel skips
        ids, mask, kept_positions = compact_items(input_ids, attention_mask, {"image": placeholder}, items, reduced,
                                                  pad_id(model, image), left)
        # [images, kept, D], as the projector gives it ([images, tokens, D]): every image has the same count, so
        # keeps the same; generate() splits it by image to repeat it for beams.
        encoded.pooler_output = torch.stack([r.features for r in reduced])
        runs.record(reduction, Gemma3Report(
            visual_tokens_before=placeholder.sum(1), visual_tokens_after=(ids == image).sum(1),
            kept_positions=kept_positions, prefill_macs=prefill_macs(model, mask.sum(1)),
            prefill_macs_unreduced=prefill_macs(model, attention_mask.sum(1)), reducer_macs=reducer_macs,
            **report_fields(items, reduced)))
        kept_types = types.gather(1, kept_positions.clamp_min(0)).masked_fill(kept_positions < 0, 0)
        return Compacted(ids, kept_positions, dict(attention_mask=mask.to(attention_mask.dtype),
                                                   token_type_ids=kept_types, mm_encoder_outputs={"image": encoded}))


FAMILY = Family(prepare, (*VISION_ARGUMENTS, "attention_mask", "token_type_ids"), Gemma3Report, WHERE, "Gemma 3")


def generate(model: nn.Module, generate_fn: Callable, inputs: Optional[Tensor], *args, **kwargs):
    """``generate()`` on the compacted prompt with the reduced features; the caller's prompt, then the new tokens."""
    return calls.generate(model, FAMILY, generate_fn, inputs, *args, **kwargs)


def forward(model: nn.Module, original_forward: Callable, arguments: dict):
    """The model's forward; with pixel values it runs on the compacted prompt (``vtr.report(model).kept_positions``
    maps its logits back to the caller's columns)."""
    return calls.forward(model, FAMILY, original_forward, arguments)
