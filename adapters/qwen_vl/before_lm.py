"""Qwen-VL reduction before the language model: each image keeps ``budget`` visual tokens; ``generate()`` unchanged.

Where: once per image (and per video), on the vision tower's output after its 2x2 patch merger (the
very tokens the language model reads), with any vtr reducer. Images of different sizes in one batch
each keep ``min(budget, their own count)``; an image with at most ``budget`` tokens passes untouched.
``pool`` keeps the count its factor gives each image's own grid (``ceil(rows/f) * ceil(cols/f)``).

The prompt is compacted as LLaVA's is (``vtr.adapters.vlm.prompt``): each image keeps as many
placeholders as it kept tokens, padding is rebuilt, and the reduced features go in through
``mm_encoder_outputs``, so the language model runs an ordinary, shorter prompt (short KV cache, any
attention kernel, every row of a batch computes what it computes alone).

M-RoPE positions: the positions of the caller's whole prompt come from the model's own
``get_rope_index`` (so they need ``mm_token_type_ids``, which the processor returns), and every token
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
continue from them. ``forward()`` sets ``model.model.rope_deltas`` for the compacted prompt, as the
unpatched forward sets it for its prompt (a decode step by hand on its cache continues from it).

Qwen's vision tower has no CLS token: methods that rank by CLS attention (``evit``, ``fastv``,
``hired``) use their no-CLS score (the norm of each token's features, ``vtr.reducers.select``).
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
from vtr.core.state import TokenState
from vtr.reducers.pool import GridPool

from ..vlm.language import prefill_macs
from ..vlm.prompt import compact, kept_placeholders, pad_id, row_queries, with_callers_prompt
from ..vlm.reduce import in_source_order, padded, reduce_group
from ..vlm.report import text_only_report
from ..vlm.run import opened
from ..vlm.video import VideoSettings, reduce_video
from .common import (VISION_ARGUMENTS, WHERE, QwenVLReport, Visual, check_token_types, cost, merge_size,
                     prompt_positions, visuals)


# -- the patched entry points ------------------------------------------------------------------------

def generate(model: nn.Module, generate_fn: Callable, inputs: Optional[Tensor], *args, **kwargs):
    """``generate()`` on the compacted prompt with the reduced features and their positions; returns the
    caller's prompt followed by the new tokens."""
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    vision = {k: kwargs.pop(k) for k in VISION_ARGUMENTS if kwargs.get(k) is not None}
    if kwargs.get("mm_encoder_outputs") is not None:
        raise ValueError("precomputed mm_encoder_outputs would bypass vtr's reduction on a patched Qwen-VL; pass "
                         "pixel_values / pixel_values_videos (or vtr.unpatch(model) first)")
    if "pixel_values" not in vision and "pixel_values_videos" not in vision:
        if input_ids is not None:
            runs.record(model._vtr, text_only_report(model, input_ids, kwargs.get("attention_mask"), WHERE,
                                                     QwenVLReport))
        return generate_fn(input_ids, *args, **vision, **kwargs)
    _refuse_position_ids(kwargs)
    with torch.no_grad():   # as generate() itself: no autograd graph for the tower (assisted decoding copies it)
        prepared = prepare(model, input_ids, kwargs.pop("attention_mask", None), kwargs.pop("mm_token_type_ids", None),
                           kwargs.pop("second_per_grid_ts", None), left=True, **vision)
    output = generate_fn(prepared.input_ids, *args, attention_mask=prepared.attention_mask,
                         position_ids=prepared.position_ids, mm_token_type_ids=prepared.mm_token_type_ids,
                         mm_encoder_outputs=prepared.encoder_outputs, **kwargs)
    return with_callers_prompt(output, input_ids, prepared.input_ids.shape[1])


def forward(model: nn.Module, original_forward: Callable, arguments: dict):
    """The model's forward; with pixel values it runs on the compacted prompt (``vtr.report(model).kept_positions``
    maps its logits back to the caller's columns)."""
    if arguments.get("pixel_values") is None and arguments.get("pixel_values_videos") is None:
        return original_forward(model, **arguments)
    _refuse_position_ids(arguments)
    mask = arguments.get("attention_mask")
    right_padded = mask is not None and bool((mask[:, -1] == 0).any())
    vision = {k: arguments.pop(k) for k in VISION_ARGUMENTS if arguments.get(k) is not None}
    prepared = prepare(model, arguments.get("input_ids"), mask, arguments.pop("mm_token_type_ids", None),
                       arguments.pop("second_per_grid_ts", None), left=not right_padded, **vision)
    if arguments.get("labels") is not None:
        labels = arguments["labels"].gather(1, prepared.kept_positions.clamp_min(0))
        arguments["labels"] = labels.masked_fill(prepared.kept_positions < 0, -100)
    arguments.update(input_ids=prepared.input_ids, attention_mask=prepared.attention_mask,
                     position_ids=prepared.position_ids, mm_token_type_ids=prepared.mm_token_type_ids,
                     mm_encoder_outputs=prepared.encoder_outputs)
    # As the unpatched forward does for its prompt (transformers' own attribute): a decode step by hand on
    # this forward's cache, without position_ids, continues from the compacted prompt's last position.
    positions, mask = prepared.position_ids[1:], prepared.attention_mask
    model.model.rope_deltas = positions.amax(dim=(0, 2))[:, None] + 1 - mask.sum(1, keepdim=True)
    return original_forward(model, **arguments)


def _refuse_position_ids(arguments: dict) -> None:
    if arguments.get("position_ids") is not None:
        raise ValueError("position_ids cannot be combined with pixel values on a vtr-patched Qwen-VL: the prompt is "
                         "compacted and vtr gives every kept token its own M-RoPE position (from mm_token_type_ids)")


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


@dataclass
class Reduced:
    """One image's (or video's) reduced tokens, in the order the language model reads them."""

    features: Tensor       # [K, D]
    assignment: Tensor     # [N] index of the output token carrying each original one, -1 dropped
    size: Tensor           # [K] original tokens each output token stands for
    first: Tensor          # [K] its representative: the first original token it carries
    tokens: list           # tokens entering each reducer step, then kept


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
    check_token_types(input_ids, mm_token_type_ids, config.image_token_id, config.video_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    reduction: Reduction = model._vtr
    image_placeholder, video_placeholder = input_ids == config.image_token_id, input_ids == config.video_token_id
    with opened(model) as run:
        outputs, items = {}, []
        if pixel_values is not None:
            outputs["image"] = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            items += visuals(list(outputs["image"].pooler_output), image_grid_thw, image_placeholder, "image",
                             merge_size(model))
        if pixel_values_videos is not None:
            outputs["video"] = model.model.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
            items += visuals(list(outputs["video"].pooler_output), video_grid_thw, video_placeholder, "video",
                             merge_size(model))
        placeholder = image_placeholder | video_placeholder
        rows = torch.tensor([item.row for item in items], dtype=torch.long)
        queries = None
        relevance = VideoSettings.of(reduction.arguments).frames == "relevance" and pixel_values_videos is not None
        if Need.QUERY in reduction.reducer.needs or relevance:
            queries = row_queries(model, input_ids, attention_mask, placeholder, rows, run.query)
        reduced, reducer_macs = reduce_visuals(model, reduction, items, queries)

        keep = attention_mask.bool() & ~placeholder
        for kind, kind_placeholder in (("image", image_placeholder), ("video", video_placeholder)):
            chosen = [(item.num_tokens, len(r.features)) for item, r in zip(items, reduced) if item.kind == kind]
            if chosen:
                counts, kept = torch.tensor(chosen, device=input_ids.device).T
                keep |= kept_placeholders(kind_placeholder, counts, kept)
        ids, mask, kept_positions = compact(input_ids, keep, pad_id(model, config.image_token_id,
                                                                    config.video_token_id), left)
        full = prompt_positions(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                second_per_grid_ts)
        positions = _kept_positions(full, input_ids.shape[1], items, reduced, kept_positions)
        text = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        for kind in outputs:
            outputs[kind].pooler_output = [r.features for item, r in zip(items, reduced) if item.kind == kind]
        _record(model, reduction, items, reduced, rows, full, placeholder, ids, mask, attention_mask, kept_positions,
                reducer_macs)
        types = mm_token_type_ids.gather(1, kept_positions.clamp_min(0)).masked_fill(kept_positions < 0, 0)
        return Prepared(ids, mask.to(attention_mask.dtype), torch.cat([text[None], positions]), types, outputs,
                        kept_positions)


def _kept_positions(full: Tensor, length: int, items: list[Visual], reduced: list[Reduced],
                    kept_positions: Tensor) -> Tensor:
    """``[3, B, L']`` position of each column of the compacted prompt: a text token's own; the k-th kept
    placeholder of an image takes the position of the k-th output token's representative (0 at padding)."""
    source = torch.arange(length, device=kept_positions.device).expand(kept_positions.shape[0], -1).clone()
    for item, r in zip(items, reduced):
        first = r.first.clamp_max(item.num_tokens - 1)   # a token carrying nothing (empty fused token) sits last
        source[item.row, item.columns[:len(first)]] = item.columns[first]
    source = source.gather(1, kept_positions.clamp_min(0))
    positions = full.gather(2, source[None].expand(3, -1, -1))
    return positions.masked_fill(kept_positions[None] < 0, 0)


# -- reducing every image and video -------------------------------------------------------------------

def budget_of(reduction: Reduction, item: Visual) -> int:
    """Tokens ``item`` keeps: ``min(budget, its count)``; pool: what its factor leaves of the item's grid."""
    frames, rows, cols = item.grid
    if isinstance(reduction.reducer, GridPool):
        pooled_rows, pooled_cols = reduction.reducer.pooled_grid((rows, cols))
        return item.num_tokens if frames != 1 else pooled_rows * pooled_cols
    budget = reduction.arguments.get("budget")
    return item.num_tokens if budget is None else min(budget, item.num_tokens)


def reduce_visuals(model: nn.Module, reduction: Reduction, items: list[Visual],
                   queries: Optional[list]) -> tuple[list[Reduced], float]:
    """Each item reduced to its own budget. Images of one grid are reduced together (each row of a reducer is
    independent of the others); query-conditioned reducers run image by image (each its row's query); videos one
    by one, frame by frame (``vtr.adapters.vlm.video``)."""
    groups: dict = {}
    for i, item in enumerate(items):
        key = i if queries is not None or item.kind == "video" else item.grid
        groups.setdefault(key, []).append(i)
    reduced: list = [None] * len(items)
    reducer_macs, image_cost = 0.0, cost(model, reduction.metric)
    for members in groups.values():
        if items[members[0]].kind == "video":
            item, budget = items[members[0]], reduction.arguments.get("budget")
            video = reduce_video(reduction, item.features, item.grid, budget, VideoSettings.of(reduction.arguments),
                                 image_cost, None if queries is None else queries[members[0]])
            state, firsts = in_source_order(video.state)
            reduced[members[0]] = Reduced(state.x[0], state.assignment[0], state.size[0], firsts[0], video.tokens)
            reducer_macs += video.reducer_macs
            continue
        first = items[members[0]]
        budget = budget_of(reduction, first)
        features = torch.stack([items[i].features for i in members])
        if budget >= first.num_tokens:
            state, tokens = TokenState.start(features), [first.num_tokens]
        else:
            frames, rows, cols = first.grid
            state, tokens = reduce_group(reduction, features, budget, 0,
                                         query=None if queries is None else queries[members[0]],
                                         grid=(rows, cols) if frames == 1 else None)
        reducer_macs += len(members) * sum(reduction.reducer.extra_macs(n, image_cost) for n in tokens[:-1])
        state, firsts = in_source_order(state)
        for g, i in enumerate(members):
            reduced[i] = Reduced(state.x[g], state.assignment[g], state.size[g], firsts[g], tokens)
    return reduced, reducer_macs


def _record(model: nn.Module, reduction: Reduction, items: list[Visual], reduced: list[Reduced], rows: Tensor,
            full: Tensor, placeholder: Tensor, ids: Tensor, mask: Tensor, callers_mask: Tensor, kept_positions: Tensor,
            reducer_macs: float) -> None:
    """The call's report, detached, for ``vtr.report`` in this thread."""
    config = model.config
    steps = {tuple(r.tokens) for r in reduced}
    tokens = list(steps.pop()) if len(steps) == 1 else [max(i.num_tokens for i in items),
                                                          max(len(r.features) for r in reduced)]
    grids = [item.grid for item in items]
    frame_tokens = []
    for item, r in zip(items, reduced):
        per_frame = item.grid[1] * item.grid[2]
        frame_tokens.append(torch.bincount(r.first.clamp_max(item.num_tokens - 1) // per_frame,
                                           minlength=item.grid[0]).tolist())
    runs.record(reduction, QwenVLReport(
        tokens=tokens,
        assignment=padded([r.assignment.detach() for r in reduced], -1),
        size=padded([r.size.detach() for r in reduced], 0.0),
        num_protected=0,
        grid=grids[0][1:] if len(set(grids)) == 1 and grids[0][0] == 1 else None,
        image_rows=rows,
        visual_tokens_before=placeholder.sum(1),
        visual_tokens_after=((ids == config.image_token_id) | (ids == config.video_token_id)).sum(1),
        kept_positions=kept_positions,
        prefill_macs=prefill_macs(model, mask.sum(1)),
        prefill_macs_unreduced=prefill_macs(model, callers_mask.sum(1)),
        reducer_macs=reducer_macs,
        image_tokens_before=torch.tensor([item.num_tokens for item in items]),
        image_tokens_after=torch.tensor([len(r.features) for r in reduced]),
        grids=grids,
        kinds=[item.kind for item in items],
        visual_positions=[full[:, item.row, item.columns[r.first.clamp_max(item.num_tokens - 1)]]
                          for item, r in zip(items, reduced)],
        frame_tokens=frame_tokens,
    ))
