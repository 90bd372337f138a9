"""Qwen-VL reduction before the language model: each image keeps ``budget`` visual tokens; ``generate()`` unchanged.

Where: once per image (and per video), on the vision tower's output after its 2x2 patch merger (the
very tokens the language model reads), with any vtr reducer; or, with ``tower_layer=K``, inside the tower after its
block K, on whole 2x2 units (``tower``: the same decision, the same compaction and positions afterwards). Images of
different sizes in one batch each keep ``min(budget, their own count)``; an image with at most ``budget`` tokens
passes untouched. ``pool`` keeps the count its factor gives each image's own grid (``ceil(rows/f) * ceil(cols/f)``).

The prompt is compacted as LLaVA's is (``vtr.adapters.vlm.prompt``): each image keeps as many
placeholders as it kept tokens, padding is rebuilt, and the reduced features go in through
``mm_encoder_outputs``, so the language model runs an ordinary, shorter prompt (short KV cache, any
attention kernel, every row of a batch computes what it computes alone).

M-RoPE positions: the positions of the caller's whole prompt come from the model's own
``get_rope_index`` (from ``mm_token_type_ids``, which the processor returns, or derived from ``input_ids``
by the processor's rule when a call has none), and every token
of the compacted prompt keeps the (temporal, height, width) position it had there: text keeps its
own (text after an image still starts past the image's full extent, as the model was trained), a
kept visual token its own, and a merged token its *representative's*, the first original token (in
raster order) it carries. Not a size-weighted mean: a mean lands between grid points, where no
token of any image the model was trained on sits, and for tokens merged across the image (sky in
two corners) at a place neither came from; it could also coincide with another kept token's
position. The representative keeps positions integer and distinct within an image, and a merge of
neighbours (pool, most merges) sits at its window's top-left token. Visual tokens reach the language
model in the order of their representatives (raster order), whatever order the reducer emits them in.
The positions go to the language model as ``position_ids`` (``[4, B, L']``: the compacted prompt's
1-D text positions, then t, h, w), which is what ``generate()`` itself would pass, and decode steps
continue from them. ``model.model.rope_deltas`` is set for the compacted prompt, as the unpatched model
sets it for its prompt (a decode step by hand on its cache, without position_ids, continues from it).

Qwen's vision tower has no CLS token: methods that rank by CLS attention (``evit``, ``fastv``, ``hired``) and those
defined on the tower's attention (``visionzip``, ``vispruner``, ``fastervlm``) get the attention each token receives
in the tower's last block instead (``Need.ATTENTION_RECEIVED``, computed by ``received``; the first three fall back
to the norm of each token's features only where that is missing, ``vtr.reducers.select.attention_scores``).
Query-conditioned methods get each row's own text (the language model's input embeddings of its
non-visual tokens), or the query from ``vtr.conditioned``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.signals import Need

from ..vlm.language import prefill_macs
from ..vlm import calls
from ..vlm.calls import Compacted, Family
from ..vlm.items import Reduced, Visual, compact_items, kept_columns_by_span, reduce_items, report_fields
from ..vlm.prompt import pad_id, row_queries
from ..vlm.run import opened
from . import received, tower
from .common import (VISION_ARGUMENTS, WHERE, QwenVLReport, cost, merge_size, prompt_positions, token_types,
                     visuals, where_in_tower)


# -- the patched entry points ------------------------------------------------------------------------

def _compacted(model: nn.Module, input_ids: Optional[Tensor], inputs: dict, left: bool) -> Compacted:
    vision = {key: inputs[key] for key in VISION_ARGUMENTS if key in inputs}
    prepared = prepare(model, input_ids, inputs.get("attention_mask"), inputs.get("mm_token_type_ids"),
                       inputs.get("second_per_grid_ts"), left, **vision)
    return Compacted(prepared.input_ids, prepared.kept_positions, dict(
        attention_mask=prepared.attention_mask, position_ids=prepared.position_ids,
        mm_token_type_ids=prepared.mm_token_type_ids, mm_encoder_outputs=prepared.encoder_outputs))


FAMILY = Family(_compacted, (*VISION_ARGUMENTS, "attention_mask", "mm_token_type_ids", "second_per_grid_ts"),
                QwenVLReport, WHERE, "Qwen-VL")


def generate(model: nn.Module, generate_fn: Callable, inputs: Optional[Tensor], *args, **kwargs):
    """``generate()`` on the compacted prompt with the reduced features and their positions; returns the
    caller's prompt followed by the new tokens."""
    return calls.generate(model, FAMILY, generate_fn, inputs, *args, **kwargs)


def forward(model: nn.Module, original_forward: Callable, arguments: dict):
    """The model's forward; with pixel values it runs on the compacted prompt (``vtr.report(model).kept_positions``
    maps its logits back to the caller's columns)."""
    return calls.forward(model, FAMILY, original_forward, arguments)


# -- one call ---------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """Compacted inputs for the language model and what to restore for the caller."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor          # [4, B, L']: 1-D text positions, then temporal, height, width
    mm_token_type_ids: Tensor
    encoder_outputs: dict         # mm_encoder_outputs: the towers' outputs with reduced pooler_output
    kept_positions: Tensor        # [B, L'] source column in the caller's prompt, -1 padding


def prepare(model: nn.Module, input_ids: Optional[Tensor], attention_mask: Optional[Tensor],
            mm_token_type_ids: Optional[Tensor], second_per_grid_ts: Optional[Tensor], left: bool,
            pixel_values: Optional[Tensor] = None, image_grid_thw: Optional[Tensor] = None,
            pixel_values_videos: Optional[Tensor] = None, video_grid_thw: Optional[Tensor] = None) -> Prepared:
    """Encode the images and videos, reduce each, compact the prompt with every kept token's M-RoPE position,
    record the report (in this call's run)."""
    if input_ids is None:
        raise ValueError("a vtr-patched Qwen-VL needs input_ids with pixel values: the image span is found from "
                         "config.image_token_id / video_token_id in input_ids (inputs_embeds are not supported)")
    for pixels, grid, kind in ((pixel_values, image_grid_thw, "image"), (pixel_values_videos, video_grid_thw, "video")):
        if pixels is not None and grid is None:
            raise ValueError(f"{kind}_grid_thw is needed with the {kind} pixel values (as the processor returns it)")
    config = model.config
    mm_token_type_ids = token_types(input_ids, mm_token_type_ids, config.image_token_id, config.video_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    reduction: Reduction = model._vtr
    image_placeholder, video_placeholder = input_ids == config.image_token_id, input_ids == config.video_token_id
    with opened(model) as run:
        placeholder = image_placeholder | video_placeholder
        relevance = reduction.visual.frames == "relevance" and pixel_values_videos is not None

        def query_of(items: list[Visual]) -> Optional[list]:
            if Need.QUERY not in reduction.reducer.needs and not relevance:
                return None
            rows = torch.tensor([item.row for item in items], dtype=torch.long)
            return row_queries(model, input_ids, attention_mask, placeholder, rows, run.query)

        encoded = [(kind, pixels, grid, own) for kind, pixels, grid, own in (
            ("image", pixel_values, image_grid_thw, image_placeholder),
            ("video", pixel_values_videos, video_grid_thw, video_placeholder)) if pixels is not None]
        if reduction.visual.in_tower:
            outputs, items, reduced, reducer_macs, tower_counts = _in_tower(model, run, encoded, query_of)
        else:
            outputs, items, reduced, reducer_macs = _after_tower(model, run, encoded, query_of)
            tower_counts = (None, None)
        ids, mask, kept_positions = compact_items(
            input_ids, attention_mask, {"image": image_placeholder, "video": video_placeholder}, items, reduced,
            pad_id(model, config.image_token_id, config.video_token_id), left, by_span=True)
        full = prompt_positions(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                second_per_grid_ts)
        positions = _kept_positions(full, input_ids.shape[1], items, reduced, kept_positions)
        text = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        # As the unpatched model does for its prompt (transformers' own attribute): a decode step by hand on
        # this prompt's cache, without position_ids, continues from the compacted prompt's last position.
        model.model.rope_deltas = positions.amax(dim=(0, 2))[:, None] + 1 - mask.sum(1, keepdim=True)
        for kind in outputs:
            own = [r for item, r in zip(items, reduced) if item.kind == kind]
            outputs[kind].pooler_output = [r.features for r in own]
            deepstack = getattr(outputs[kind], "deepstack_features", None)
            if deepstack is not None and not reduction.visual.in_tower:
                # Qwen3-VL: every injected tower level keeps the very tokens the LM input kept
                outputs[kind].deepstack_features = [[r.carried(level[i]) for i, r in enumerate(own)]
                                                    for level in deepstack]
        runs.record(reduction, QwenVLReport(
            visual_tokens_before=placeholder.sum(1),
            visual_tokens_after=((ids == config.image_token_id) | (ids == config.video_token_id)).sum(1),
            kept_positions=kept_positions, prefill_macs=prefill_macs(model, mask.sum(1)),
            prefill_macs_unreduced=prefill_macs(model, attention_mask.sum(1)), reducer_macs=reducer_macs,
            visual_positions=[full[:, item.row, item.columns[r.first.clamp_max(item.num_tokens - 1)]]
                              for item, r in zip(items, reduced)],
            tower_layer=reduction.visual.tower_layer, tower_macs=tower_counts[0], tower_macs_unreduced=tower_counts[1],
            **({"where": where_in_tower(reduction.visual.tower_layer)} if reduction.visual.in_tower else {}),
            **report_fields(items, reduced)))
        types = mm_token_type_ids.gather(1, kept_positions.clamp_min(0)).masked_fill(kept_positions < 0, 0)
        return Prepared(ids, mask.to(attention_mask.dtype), torch.cat([text[None], positions]), types, outputs,
                        kept_positions)


def _after_tower(model: nn.Module, run, encoded: list, query_of: Callable) -> tuple[dict, list, list, float]:
    """The tower on every patch, then each image (video) reduced on its output: (tower outputs by kind, items,
    reduced, reducer MACs with the received attention's)."""
    reduction: Reduction = model._vtr
    outputs, items, attention, attention_macs = {}, [], [], 0.0
    for kind, pixels, grid, placeholder in encoded:
        encode = model.model.get_image_features if kind == "image" else model.model.get_video_features
        outputs[kind] = encode(pixels, grid, return_dict=True)
        items += visuals(list(outputs[kind].pooler_output), grid, placeholder, kind, merge_size(model))
        found, macs = received.take(model, run, grid)
        attention, attention_macs = attention + [found], attention_macs + macs
    per_item = None if not attention or any(a is None for a in attention) else sum(attention, [])
    reduced, reducer_macs = reduce_items(reduction, items, query_of(items), cost(model, reduction.metric), per_item)
    return outputs, items, reduced, reducer_macs + attention_macs   # received: a pass the fused kernel skips


def _in_tower(model: nn.Module, run, encoded: list,
              query_of: Callable) -> tuple[dict, list, list, float, tuple[float, float]]:
    """Each tower call reduced inside the tower after block K (``tower``): (tower outputs by kind, items, reduced
    with the features the language model reads, reducer MACs, (tower MACs as run, unreduced))."""
    reduction: Reduction = model._vtr
    visual, layer = model.model.visual, reduction.visual.tower_layer
    outputs, items, reduced, reducer_macs, macs, unreduced = {}, [], [], 0.0, 0.0, 0.0
    for kind, pixels, grid, placeholder in encoded:
        spent = []

        def decide(features: list[Tensor], scores: Optional[list]) -> tuple[list, list]:
            own = visuals(features, grid, placeholder, kind, merge_size(model))
            decided, decision_macs = reduce_items(reduction, own, query_of(own),
                                                  tower.unit_cost(model, cost(model, reduction.metric)), scores)
            spent.append(decision_macs)
            return own, decided

        call = tower.TowerCall(visual, grid, decide)
        tower.start(run, call)
        try:
            encode = model.model.get_image_features if kind == "image" else model.model.get_video_features
            outputs[kind] = output = encode(pixels, grid, return_dict=True)
        finally:
            tower.finish(run)
        if call.reduced is None:
            raise RuntimeError(f"the Qwen-VL tower ran without reaching block {layer}'s hook: reducing inside the "
                               "tower needs the model's own tower forward (no compiled or replaced tower)")
        kept = [Reduced(features[r.first], r.assignment, r.size, r.first, r.tokens)
                for features, r in zip(output.pooler_output, call.reduced)]
        deepstack = getattr(output, "deepstack_features", None)
        if deepstack is not None:   # Qwen3-VL: levels before K ran on every unit; from K on on the kept ones
            output.deepstack_features = [[r.carried(f) if block < layer else f[r.first]
                                          for f, r in zip(level, call.reduced)]
                                         for block, level in zip(visual.deepstack_visual_indexes, deepstack)]
        items, reduced = items + call.items, reduced + kept
        reducer_macs += sum(spent) + call.received_macs
        as_run, full = tower.call_macs(call, visual, layer)
        macs, unreduced = macs + as_run, unreduced + full
    return outputs, items, reduced, reducer_macs, (macs, unreduced)


def _kept_positions(full: Tensor, length: int, items: list[Visual], reduced: list[Reduced],
                    kept_positions: Tensor) -> Tensor:
    """``[3, B, L']`` position of each column of the compacted prompt: a text token's own; the k-th kept
    placeholder of an image takes the position of the k-th output token's representative (0 at padding)."""
    source = torch.arange(length, device=kept_positions.device).expand(kept_positions.shape[0], -1).clone()
    for item, r in zip(items, reduced):
        first = r.first.clamp_max(item.num_tokens - 1)   # a token carrying nothing (empty fused token) sits last
        source[item.row, kept_columns_by_span(item, r)] = item.columns[first]
    source = source.gather(1, kept_positions.clamp_min(0))
    positions = full.gather(2, source[None].expand(3, -1, -1))
    return positions.masked_fill(kept_positions[None] < 0, 0)
