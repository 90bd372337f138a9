"""Reduction before the language model: fewer visual tokens reach it; ``generate()`` unchanged.

Where: once per image, on the projector output (the very tokens the language model would read),
with any vtr reducer, down to ``budget`` tokens per image. A reducer whose ``max_step`` is below 1
(bipartite merging removes at most half per step) runs as many steps as the budget needs.
LLaVA-1.5 reduces every image alike here; LLaVA-NeXT hands each image to ``anyres`` (its budget split
over the thumbnail and the crops).

How the language model sees it: the prompt is *compacted*. Each image keeps as many ``<image>``
placeholders (found from ``config.image_token_id``, never a hard-coded span) as it kept tokens,
padding is rebuilt on the left, and the reduced features go in through ``mm_encoder_outputs``.
The language model then runs an ordinary, shorter prompt. Its positions (``positions=``): by default
(``"original"``) every kept token keeps the position it had in the caller's prompt (a merged token the
mean of its sources'), passed as ``position_ids``, and ``generate()`` continues from the caller's last
position; the trained yardstick LLaVA keeps 4-7 points more of its answers that way at 25% of the tokens
(``benchmarks/RESULTS-vlm-fidelity.md``): compaction moves the text after the image and erases where each
kept token was. ``"compact"`` numbers the compacted prompt consecutively, as the published LLaVA code of
the pruning papers does. Either way the KV cache is
short from the first step, every attention implementation works, and each row of a batch
computes what it would compute alone, whatever each row kept. ``generate()`` returns the caller's
own prompt followed by the new tokens, as the unpatched model does.

A reducer that reads the CLS attention row (or that layer's keys, head mean: ``Need.KEYS``) gets it from the
vision layer LLaVA reads: ``KeepQK``
hooks on that attention's q/k projections (installed at patch time, plain objects) hand the call's
run the q and k the layer computes anyway; the run drops them when the call ends.

Imports ``anyres`` (LLaVA-NeXT's split) and ``common``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.signals import Need, cls_attention
from vtr.core.state import TokenState

from ..base import remove_hooks
from ..errors import UnsupportedModelError
from ..vlm import calls
from ..vlm.calls import Compacted, Family
from ..vlm.prompt import image_rows, pad_id, row_queries, source_positions
from . import anyres
from .common import (VISION_KEYS, WHERE, LlavaReport, ReducedImages, VlmRun, check_image_sizes, compact_prompt,
                     decision_macs, feature_attention, image_tokens, is_next, opened, padded, prefill_macs,
                     reduce_group, reduction_steps, step_counts)

VISION_LAYER = -1   # the key the run keeps the vision feature layer's q/k under (no decoder layer is -1)
ALLOCATION_LAYER = -2   # ...and the q/k of the layer whose CLS attention splits LLaVA-NeXT budgets (HiRED)


def _wants_cls_attention(model: nn.Module, reduction: Reduction) -> bool:
    """The reducer reads the CLS attention row or the feature layer's keys, or LLaVA-NeXT splits budgets by the
    thumbnail's row."""
    return bool({Need.CLS_ATTENTION, Need.KEYS} & reduction.reducer.needs) or (is_next(model) and reduction.reduces)


def install(model: nn.Module, reduction: Reduction) -> None:
    """Patch time: hooks that keep the feature layer's q/k for the call, where a CLS attention row is wanted
    and the tower has one (without it LLaVA-NeXT's crops share by token count)."""
    attention = feature_attention(model, required=False) if _wants_cls_attention(model, reduction) else None
    if attention is not None:
        attention.q_proj.register_forward_hook(runs.KeepQK(VISION_LAYER, "q"))
        attention.k_proj.register_forward_hook(runs.KeepQK(VISION_LAYER, "k"))
        allocation = allocation_attention(model, reduction)
        if allocation is not None:
            allocation.q_proj.register_forward_hook(runs.KeepQK(ALLOCATION_LAYER, "q"))
            allocation.k_proj.register_forward_hook(runs.KeepQK(ALLOCATION_LAYER, "k"))


def allocation_attention(model: nn.Module, reduction: Reduction) -> Optional[nn.Module]:
    """The vision layer whose CLS attention splits a LLaVA-NeXT image's budget across its crops, when the
    method names one (HiRED's ``allocate_layer``); None: the feature layer's attention does it."""
    layer = getattr(reduction.reducer, "allocate_layer", None)
    if layer is None or not is_next(model):
        return None
    layers = model.model.vision_tower.encoder.layers
    if layer >= len(layers):
        raise ValueError(f"{reduction.method}: allocate_layer must be a layer of the vision tower, in "
                         f"[0, {len(layers) - 1}], got {layer}")
    return layers[layer].self_attn


def uninstall(model: nn.Module) -> None:
    remove_hooks(model, runs.KeepQK)


# -- the patched entry points ------------------------------------------------------------------------

def _compacted(model: nn.Module, input_ids: Optional[Tensor], inputs: dict, left: bool) -> Compacted:
    vision = {key: inputs[key] for key in VISION_KEYS if key in inputs}
    prepared = prepare(model, input_ids, inputs.get("attention_mask"), inputs["pixel_values"], left, **vision)
    given = dict(attention_mask=prepared.attention_mask, mm_encoder_outputs={"image": prepared.image_outputs})
    if prepared.position_ids is not None:   # generate() continues from the last one (the caller's last position)
        given["position_ids"] = prepared.position_ids
    return Compacted(prepared.input_ids, prepared.kept_positions, given)


FAMILY = Family(_compacted, ("pixel_values", "attention_mask", *VISION_KEYS), LlavaReport, WHERE, "LLaVA")


def generate(model: nn.Module, generate_fn: Callable, inputs: Optional[Tensor], *args, **kwargs):
    """``generate()`` on the compacted prompt with the reduced features; returns the caller's prompt
    followed by the new tokens."""
    return calls.generate(model, FAMILY, generate_fn, inputs, *args, **kwargs)


def forward(model: nn.Module, original_forward: Callable, arguments: dict):
    """The model's forward; with ``pixel_values`` it runs on the compacted prompt (see LlavaReport)."""
    return calls.forward(model, FAMILY, original_forward, arguments)


@dataclass
class Prepared:
    """Compacted inputs for the language model and what to restore for the caller."""

    input_ids: Tensor
    attention_mask: Tensor
    image_outputs: object          # the vision tower's output with reduced ``pooler_output``
    kept_positions: Tensor         # [B, L'] source column in the caller's prompt, -1 padding
    position_ids: Optional[Tensor] = None   # [B, L'] the caller's positions (positions="original"); None: compacted


def prepare(model: nn.Module, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], pixel_values: Tensor,
            left: bool, **vision) -> Prepared:
    """Encode the images, reduce each one, compact the prompt, record the report (in this call's run:
    the one of the ``generate()``/``forward`` in progress, else its own)."""
    if input_ids is None:
        raise ValueError("a vtr-patched LLaVA needs input_ids with pixel_values: the image span is found from "
                         "config.image_token_id in input_ids (inputs_embeds are not supported)")
    next_ = is_next(model)
    if not next_ and vision.get("image_sizes") is not None:
        raise UnsupportedModelError("image_sizes (per-image resolutions) are for LLaVA-NeXT; vtr's LLaVA-1.5 "
                                    "path does not take them")
    if next_ and vision.get("image_sizes") is None:
        raise ValueError("LLaVA-NeXT needs image_sizes ([images, 2] height and width of each image, as the "
                         "processor returns them) with pixel_values")
    if next_:
        check_image_sizes(pixel_values, vision["image_sizes"])
    reduction: Reduction = model._vtr
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with opened(model) as run:
        image_outputs = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **vision)
        keys = _keys(model, run) if Need.KEYS in reduction.reducer.needs else None
        cls_row, allocation_row = _cls_row(model, run), _cls_row(model, run, ALLOCATION_LAYER)
        features = list(image_outputs.pooler_output)                    # [N_i, D] per image
        counts = torch.tensor([len(f) for f in features], dtype=torch.long, device=input_ids.device)
        image_token_id = model.config.image_token_id
        placeholder = input_ids == image_token_id
        if int(placeholder.sum()) != int(counts.sum()):
            raise ValueError(
                f"the prompt has {int(placeholder.sum())} image tokens (id {image_token_id}) but the "
                f"{len(features)} images give {int(counts.sum())} features"
            )
        rows = image_rows(placeholder, counts)
        query = None
        if Need.QUERY in reduction.reducer.needs:
            query = row_queries(model, input_ids, attention_mask, placeholder, rows, run.query)
        if image_tokens(model)[1] == 0:   # the CLS token is not among the 'default' features
            cls_row = None if cls_row is None else cls_row[:, 1:]
            keys = None if keys is None else keys[:, 1:]
        if next_:
            if allocation_row is not None:
                allocation_row = allocation_row[:, 1:]   # LLaVA-NeXT reads 'default' features only
            images = anyres.reduce_images(model, reduction, features, cls_row, query, vision["image_sizes"],
                                          allocation=allocation_row, keys=keys)
        else:
            images = _reduce_images(model, reduction, features, cls_row, query, keys)

        kept = torch.tensor([len(f) for f in images.features], dtype=torch.long, device=input_ids.device)
        ids, mask, kept_positions = compact_prompt(input_ids, attention_mask, image_token_id, counts, kept,
                                                   pad_id(model, image_token_id), left)
        image_outputs.pooler_output = images.features
        _record(model, reduction, images, rows, placeholder, ids == image_token_id, attention_mask, mask,
                kept_positions)
        position_ids = None
        if reduction.visual.positions == "original":
            position_ids = source_positions(attention_mask, placeholder, images.assignment, kept.tolist(),
                                            kept_positions, ids == image_token_id)
        return Prepared(ids, mask, image_outputs, kept_positions, position_ids)


def expected_flops(model: nn.Module, reduction: Reduction) -> tuple[float, float]:
    """(reduced, unreduced) language-model prefill MACs of one image's visual tokens alone (no text),
    the reducer's own decisions included; the vision tower is the same either way.
    LLaVA-NeXT: of the largest image (crops split by token count; the thumbnail's attention is only
    known at run time)."""
    num_tokens, protected = image_tokens(model)
    if is_next(model) and reduction.reduces:
        budget = reduction.visual.budget
        parts = anyres.expected_parts(model, budget)
        decisions = sum(decision_macs(model, reduction, step_counts(n, reduction_steps(n, b, reduction.reducer, 0)))
                        for n, b in parts)
        kept = budget
    else:
        tokens = reduction.schedule.token_counts(reduction.reducer, num_tokens, protected)
        decisions, kept = decision_macs(model, reduction, tokens), tokens[-1]
    reduced, unreduced = prefill_macs(model, torch.tensor([kept, num_tokens])).tolist()
    return reduced + decisions, unreduced


# -- the parts ------------------------------------------------------------------------------------------

def _keys(model: nn.Module, run: VlmRun) -> Optional[Tensor]:
    """``[I, N, d]`` the feature layer's attention keys, head mean (VisionZip's similarity), from the k the
    ``KeepQK`` hook kept in this run (left there for :func:`_cls_row`); None without the hook."""
    k = run.captured.get((VISION_LAYER, "k"))
    if k is None:
        return None
    heads = feature_attention(model).num_heads
    return k.view(k.shape[0], k.shape[1], heads, -1).mean(dim=2)


def _cls_row(model: nn.Module, run: VlmRun, key: int = VISION_LAYER) -> Optional[Tensor]:
    """``[I, N]`` head-mean attention of the CLS token to each token of the feature layer (or, with
    ``key=ALLOCATION_LAYER``, of the allocation layer), from the q/k the ``KeepQK`` hooks kept in this
    run while the tower ran; None without those hooks."""
    q, k = run.take_qk(key)
    if q is None or k is None:
        return None
    attention = feature_attention(model) if key == VISION_LAYER else allocation_attention(model, model._vtr)
    split = lambda t: t.view(t.shape[0], t.shape[1], attention.num_heads, -1).transpose(1, 2)  # noqa: E731
    return cls_attention(split(q), split(k), scale=attention.scale)


def _reduce(model: nn.Module, reduction: Reduction, features: Tensor, attention: Optional[Tensor],
            query: Optional[list], keys: Optional[Tensor] = None) -> tuple[TokenState, list[int], float]:
    """Run the reducer's steps on every image ``[I, N, D]``; query-conditioned reducers run image by image."""
    num_tokens, protected = features.shape[1], image_tokens(model)[1]
    budget = num_tokens - sum(reduction.schedule.amounts)
    if num_tokens != image_tokens(model)[0]:
        budget = min(num_tokens if reduction.visual.budget is None else reduction.visual.budget, num_tokens)
    if not reduction.reduces:
        budget = num_tokens
    side = int(round((num_tokens - protected) ** 0.5))
    grid = (side, side) if side * side == num_tokens - protected else None
    groups = [slice(i, i + 1) for i in range(features.shape[0])] if query is not None else [slice(None)]
    states = []
    for i, group in enumerate(groups):
        state, tokens = reduce_group(reduction, features[group], budget, protected,
                                     attention=None if attention is None else attention[group],
                                     query=None if query is None else query[i], grid=grid,
                                     keys=None if keys is None else keys[group])
        states.append(state)
    return TokenState.stacked(states), tokens, features.shape[0] * decision_macs(model, reduction, tokens)


def _reduce_images(model: nn.Module, reduction: Reduction, features: list[Tensor], attention: Optional[Tensor],
                   query: Optional[list], keys: Optional[Tensor] = None) -> ReducedImages:
    """LLaVA-1.5: every image has the same count and the same budget."""
    state, tokens, reducer_macs = _reduce(model, reduction, torch.stack(features), attention, query, keys)
    side = int(round((state.num_original - state.num_protected) ** 0.5))
    return ReducedImages(
        features=list(state.x), assignment=list(state.assignment), size=list(state.size), tokens=tokens,
        reducer_macs=reducer_macs, num_protected=state.num_protected,
        grid=(side, side) if side * side == state.num_original - state.num_protected else None)


def _record(model: nn.Module, reduction: Reduction, images: ReducedImages, image_rows: Tensor, placeholder: Tensor,
            kept_placeholder: Tensor, mask: Tensor, compact_mask: Tensor, kept_positions: Tensor) -> None:
    """The call's report, detached, for ``vtr.report`` in this thread."""
    runs.record(reduction, LlavaReport(
        tokens=images.tokens,
        assignment=padded([a.detach() for a in images.assignment], -1),
        size=padded([s.detach() for s in images.size], 0.0),
        num_protected=images.num_protected,
        grid=images.grid,
        image_rows=image_rows,
        visual_tokens_before=placeholder.sum(1),
        visual_tokens_after=kept_placeholder.sum(1),
        kept_positions=kept_positions,
        prefill_macs=prefill_macs(model, compact_mask.sum(1)),
        prefill_macs_unreduced=prefill_macs(model, mask.sum(1)),
        reducer_macs=images.reducer_macs,
        image_tokens_before=torch.tensor([len(a) for a in images.assignment]),
        image_tokens_after=torch.tensor([len(f) for f in images.features]),
        anyres=images.anyres,
    ))
