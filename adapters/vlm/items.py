"""The images and videos of one call, reduced each to its own budget before the language model, and the prompt
compacted around them (Qwen-VL; LLaVA-OneVision and LLaVA-NeXT-Video).

An *item* is one image or video: its features as the language model would read them, where its
placeholders sit in the prompt, and, if its tokens form one, its (frames, rows, cols) grid. Images keep
``min(budget, their count)`` tokens (``pool``: what its factor leaves of their grid); videos spend their
budget frame by frame (``vtr.adapters.vlm.video``). Tokens reach the language model in the raster order of
their representatives (the first original token each carries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.budget.cost import EncoderCost
from vtr.budget import visual
from vtr.budget.visual import step_counts
from vtr.core.plan import Reduction
from vtr.core.state import TokenState

from .language import prefill_macs
from .prompt import compact, kept_placeholders
from .reduce import in_source_order, padded, reduce_group
from .video import reduce_video, tokens_per_frame


def expected_flops(model: nn.Module, reduction: Optional[Reduction], cost: EncoderCost,
                   tower_macs: float = 0.0) -> tuple[float, float]:
    """(reduced, unreduced) language-model prefill MACs of the reference image's visual tokens alone (no text, its
    ``cost.num_tokens``), the reducer's own decisions included; the vision tower is the same either way, but for
    ``tower_macs``: the reference image's scores the reducer reads from the tower, a pass its fused attention kernel
    does not make (the attention each token receives, :mod:`vtr.adapters.vlm.tower_attention`)."""
    reference = cost.num_tokens
    if reduction is None:
        unreduced = float(prefill_macs(model, torch.tensor([reference])))
        return unreduced, unreduced
    tokens = step_counts(reference, list(reduction.schedule.amounts))
    decisions = sum(reduction.reducer.extra_macs(n, cost, m) for n, m in zip(tokens[:-1], tokens[1:]) if m < n)
    reduced, unreduced = prefill_macs(model, torch.tensor([tokens[-1], reference])).tolist()
    return reduced + decisions + tower_macs, unreduced


@dataclass
class Visual:
    """One image or video of a call, as the language model reads it.

    grid: (frames, rows, cols) of its tokens, or None when they form no grid (a packed AnyRes image).
    columns: ``[N + S]`` prompt column of each of its placeholders, in order (row ``row``).
    suffix: ``[S, D]`` tokens after its own that always stay (LLaVA-OneVision's newline after a video).
    """

    kind: str            # "image" or "video"
    grid: Optional[tuple]
    features: Tensor     # [N, D], raster order: frame by frame, row by row
    row: int
    columns: Tensor
    suffix: Optional[Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    @property
    def num_suffix(self) -> int:
        return 0 if self.suffix is None else self.suffix.shape[0]


def split_items(features: list[Tensor], grids: list, placeholder: Tensor, kind: str,
                suffixes: Optional[list] = None) -> list[Visual]:
    """The call's images (or videos) from their features, grids and placeholders ``[B, L]``.

    transformers fills placeholders with the features in row-major order, item after item, so the
    placeholders split by the items' counts give each item's row and columns.
    """
    suffixes = suffixes or [None] * len(features)
    counts = [len(f) + (0 if s is None else len(s)) for f, s in zip(features, suffixes)]
    found = int(placeholder.sum())
    if found != sum(counts):
        raise ValueError(f"the prompt has {found} {kind} tokens but the {len(counts)} {kind}s give {sum(counts)} "
                         "features")
    rows, columns = placeholder.nonzero(as_tuple=True)
    items = []
    for f, grid, suffix, r, c in zip(features, grids, suffixes, rows.split(counts), columns.split(counts)):
        if len(set(r.tolist())) != 1:
            raise ValueError(f"the placeholders of one {kind} span several prompt rows: each {kind} must sit in one row")
        items.append(Visual(kind, grid, f, int(r[0]), c, suffix))
    return items


@dataclass
class Reduced:
    """One item's reduced tokens, in the order the language model reads them (its suffix last)."""

    features: Tensor       # [K + S, D]
    assignment: Tensor     # [N] index of the output token carrying each original one, -1 dropped
    size: Tensor           # [K] original tokens each output token stands for
    first: Tensor          # [K] its representative: the first original token it carries
    tokens: list           # tokens entering each reducer step, then kept

    def carried(self, values: Tensor) -> Tensor:
        """``values`` ``[N, C]`` of the item's original tokens (another view of the same tokens: Qwen3-VL's
        DeepStack features of a tower layer) taken through the same reduction: each output token the mean of
        the originals it carries (a kept token its own; zero for a token carrying none), the suffix left out.

        The reduction decided once, on ``features``; every other view of the tokens follows that decision, so
        the language model never sees one token's feature beside another token's DeepStack feature."""
        kept = len(self.size)
        rows = torch.where(self.assignment >= 0, self.assignment, kept)
        summed = values.new_zeros(kept + 1, values.shape[1]).index_add_(0, rows, values)[:kept]
        counts = torch.zeros(kept + 1, dtype=values.dtype, device=values.device).index_add_(
            0, rows, torch.ones_like(rows, dtype=values.dtype))[:kept]
        return summed / counts.clamp_min(1)[:, None]


def _stacked(signal: Optional[list], members: list[int]) -> Optional[Tensor]:
    """The members' per-item signals as one ``[G, N]`` tensor, or None."""
    return None if signal is None else torch.stack([signal[i] for i in members])


def budget_of(reduction: Reduction, item: Visual) -> int:
    """Tokens an image keeps: ``min(budget, its count)``, its suffix counted in the budget (see
    :func:`vtr.budget.visual.item_budget`)."""
    return visual.item_budget(reduction.visual, reduction.reducer, item.num_tokens, item.num_suffix, item.grid)


def reduce_items(reduction: Reduction, items: list[Visual], queries: Optional[list],
                 cost: EncoderCost, received: Optional[list] = None,
                 attention: Optional[list] = None, budgets: Optional[list] = None) -> tuple[list[Reduced], float]:
    """Each item reduced to its own budget (``cost`` prices the reducer's decisions). Images of one grid (or, with
    none, of one count) are reduced together (each row of a reducer is independent of the others); query-conditioned
    reducers run image by image (each its row's query); videos one by one, frame by frame. ``received``,
    ``attention``: per item, the attention each of its tokens receives in the vision tower, and the CLS attention
    it carries (``[N]`` each), where the family computes them. ``budgets``: per image, the tokens it keeps, where
    the family splits one budget over several items (InternVL's tiles by their thumbnail); 0 drops the item."""
    groups: dict = {}
    for i, item in enumerate(items):
        own = None if budgets is None else budgets[i]
        key = i if queries is not None or item.kind == "video" else (item.grid, item.num_tokens, own)
        groups.setdefault(key, []).append(i)
    reduced: list = [None] * len(items)
    macs = 0.0
    for members in groups.values():
        first = items[members[0]]
        query = None if queries is None else queries[members[0]]
        if first.kind == "video":
            budget = reduction.visual.budget
            video = reduce_video(reduction, first.features, first.grid,
                                 None if budget is None else max(1, budget - first.num_suffix), cost, query,
                                 None if received is None else received[members[0]],
                                 None if attention is None else attention[members[0]])
            state, tokens, macs = video.state, video.tokens, macs + video.reducer_macs
        else:
            budget = budget_of(reduction, first) if budgets is None else min(budgets[members[0]], first.num_tokens)
            features = torch.stack([items[i].features for i in members])
            if budget == 0:       # an item given nothing: no token of it reaches the language model
                for i in members:
                    reduced[i] = Reduced(features[0, :0], torch.full((first.num_tokens,), -1, dtype=torch.long,
                                                                     device=features.device),
                                         features.new_zeros(0), torch.zeros(0, dtype=torch.long,
                                                                            device=features.device),
                                         [first.num_tokens, 0])
                continue
            if budget >= first.num_tokens:
                state, tokens = TokenState.start(features), [first.num_tokens]
            else:
                spatial = first.grid[1:] if first.grid is not None and first.grid[0] == 1 else None
                state, tokens = reduce_group(reduction, features, budget, 0, query=query, grid=spatial,
                                             received=_stacked(received, members),
                                             attention=_stacked(attention, members))
            macs += len(members) * sum(reduction.reducer.extra_macs(n, cost, m) for n, m in zip(tokens[:-1], tokens[1:]))
        state, firsts = in_source_order(state)
        for g, i in enumerate(members):
            suffix = items[i].suffix
            features = state.x[g] if suffix is None else torch.cat([state.x[g], suffix.to(state.x.dtype)])
            reduced[i] = Reduced(features, state.assignment[g], state.size[g], firsts[g], tokens)
    return reduced, macs


def kept_columns_by_span(item: Visual, reduced: Reduced) -> Tensor:
    """The prompt columns an item's kept tokens take, in order: in each run of adjacent placeholders (a *span*:
    Qwen3-VL gives each video frame its own, between timestamp tokens), the first as many as the tokens whose
    representative sits in it. An item in one span keeps its first ``K`` placeholders; a video's kept tokens
    stay between their own frame's timestamps. Tokens are in their representatives' order, so the k-th kept
    column is the k-th token's. No suffix."""
    columns = item.columns
    starts = torch.ones_like(columns, dtype=torch.bool)
    starts[1:] = columns[1:] != columns[:-1] + 1
    span = starts.long().cumsum(0) - 1                               # [N] span of each placeholder
    offset = torch.arange(len(columns), device=columns.device)
    rank = offset - offset[starts][span]                             # rank of each placeholder in its span
    owner = span[reduced.first.clamp_max(len(columns) - 1)]          # span of each kept token's representative
    wanted = torch.zeros(int(span[-1]) + 1, dtype=torch.long, device=columns.device).index_add_(
        0, owner, torch.ones_like(owner))
    chosen = columns[rank < wanted[span]]
    if len(chosen) != len(reduced.first):
        raise ValueError(f"cannot place {len(reduced.first)} kept {item.kind} tokens in their own placeholder runs")
    return chosen


def compact_items(input_ids: Tensor, attention_mask: Tensor, placeholders: dict, items: list[Visual],
                  reduced: list[Reduced], pad: int, left: bool,
                  by_span: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The prompt with each item's placeholders cut to its kept count (``placeholders``: kind -> ``[B, L]``);
    ``by_span``: each item's kept tokens in their own runs of placeholders (:func:`kept_columns_by_span`)."""
    keep = attention_mask.bool()
    if by_span:
        for placeholder in placeholders.values():
            keep &= ~placeholder
        for item, r in zip(items, reduced):
            keep[item.row, kept_columns_by_span(item, r)] = True
        return compact(input_ids, keep, pad, left)
    for kind, placeholder in placeholders.items():
        keep &= ~placeholder
        chosen = [(len(item.columns), len(r.features)) for item, r in zip(items, reduced) if item.kind == kind]
        if chosen:
            counts, kept = torch.tensor(chosen, device=input_ids.device).T
            keep |= kept_placeholders(placeholder, counts, kept)
    return compact(input_ids, keep, pad, left)


def report_fields(items: list[Visual], reduced: list[Reduced]) -> dict:
    """What a report says of the items: tokens (every step if all items took the same, else [most before, most
    kept]), provenance and sizes, rows, counts, grids, kinds, and the tokens each frame kept."""
    steps = {tuple(r.tokens) for r in reduced}
    tokens = list(steps.pop()) if len(steps) == 1 else [max(i.num_tokens for i in items),
                                                          max(len(r.first) for r in reduced)]
    grids = [item.grid for item in items]
    frame_tokens = []
    for item, r in zip(items, reduced):
        if item.grid is None:
            frame_tokens.append([len(r.first)])
            continue
        frame_tokens.append(tokens_per_frame(r.first, item.grid[0], item.grid[1] * item.grid[2]))
    return dict(
        tokens=tokens,
        assignment=padded([r.assignment.detach() for r in reduced], -1),
        size=padded([r.size.detach() for r in reduced], 0.0),
        num_protected=0,
        grid=grids[0][1:] if len(set(grids)) == 1 and grids[0] is not None and grids[0][0] == 1 else None,
        image_rows=torch.tensor([item.row for item in items], dtype=torch.long),
        image_tokens_before=torch.tensor([item.num_tokens + item.num_suffix for item in items]),
        image_tokens_after=torch.tensor([len(r.features) for r in reduced]),
        grids=grids,
        kinds=[item.kind for item in items],
        frame_tokens=frame_tokens,
    )
