"""The prompt around the visual tokens: which image each placeholder belongs to, compaction after a
reduction, each row's text as a query, and ``generate()``'s output with the caller's own prompt."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vtr.core.signals import Need


def image_of_placeholder(placeholder: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """For each position: index of the image its placeholder belongs to, and its rank in that image.

    transformers fills placeholders with the images' features in row-major order, image after
    image, so the k-th placeholder of the batch belongs to the image whose cumulative count covers k.
    """
    order = placeholder.flatten().long().cumsum(0).view_as(placeholder) - 1
    ends = counts.cumsum(0)
    image = torch.searchsorted(ends, order.clamp_min(0), right=True).clamp_max(len(counts) - 1)
    rank = order - (ends - counts)[image]
    return image, rank


def kept_placeholders(placeholder: Tensor, counts: Tensor, kept: Tensor) -> Tensor:
    """``[B, L]`` True for the placeholders an image keeps: the first ``kept[i]`` of image i's ``counts[i]``."""
    if not counts.numel():
        return torch.zeros_like(placeholder)
    image, rank = image_of_placeholder(placeholder, counts)
    return placeholder & (rank < kept[image])


def compact(input_ids: Tensor, keep: Tensor, pad_id: int, left: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The columns ``keep`` marks, in order, padded again (on the left unless ``left=False``).

    Returns ``input_ids``, the attention mask (int64) and ``kept_positions`` (source column, -1 padding).
    """
    kept_positions = kept_columns(keep, left)
    real = kept_positions >= 0
    ids = torch.where(real, input_ids.gather(1, kept_positions.clamp_min(0)), pad_id)
    return ids, real.long(), kept_positions


def compact_prompt(input_ids: Tensor, attention_mask: Tensor, image_token_id: int, counts: Tensor,
                   kept: Tensor, pad_id: int, left: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Drop each image's placeholders past its kept count and the old padding; pad again.

    ``counts`` / ``kept`` ``[I]``: placeholders per image before / after. Returns ``input_ids``,
    ``attention_mask`` and ``kept_positions`` (source column, -1 padding) of the compacted prompt.
    """
    placeholder = input_ids == image_token_id
    keep = (attention_mask.bool() & ~placeholder) | kept_placeholders(placeholder, counts, kept)
    ids, real, kept_positions = compact(input_ids, keep, pad_id, left)
    return ids, real.to(attention_mask.dtype), kept_positions


def source_positions(attention_mask: Tensor, placeholder: Tensor, assignment: list, kept_counts: list,
                     kept_positions: Tensor, kept_placeholder: Tensor) -> Tensor:
    """``[B, L']`` position ids of a compacted prompt that keep the caller's positions (``positions="original"``).

    A text token keeps the position it had in the caller's prompt; a kept visual token the position of the
    placeholder it came from (a merged one, the rounded mean of its sources' positions), so the language model
    still reads *where* each kept token was, and the tokens after the image sit where it learned them. Padding
    gets 0, as ``generate()`` gives it. ``assignment``: per image, in the prompt's order, the output token carrying
    each of its placeholders (-1 dropped), and ``kept_counts`` its outputs; ``kept_placeholder`` marks the compacted prompt's visual slots, filled
    image after image with each image's outputs in order."""
    positions = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    out = positions.gather(1, kept_positions.clamp_min(0)).masked_fill(kept_positions < 0, 0)
    counts = [len(a) for a in assignment]
    visual = []
    for where, carried, outputs in zip(positions[placeholder].split(counts), assignment, kept_counts):
        carried = carried.to(where.device)
        kept = carried >= 0
        total = torch.zeros(outputs, dtype=torch.float64, device=where.device)
        total.index_add_(0, carried[kept], where[kept].double())     # integers: exact in float64
        sources = torch.bincount(carried[kept], minlength=outputs).clamp_min(1)
        visual.append(torch.round(total / sources).long())
    out[kept_placeholder] = torch.cat(visual) if visual else out[kept_placeholder]
    return out


def kept_columns(keep: Tensor, left: bool = True) -> Tensor:
    """``[B, L']`` source column of each slot of the rows' kept tokens (in order), -1 for padding."""
    lengths = keep.sum(1)
    width = int(lengths.max()) if lengths.numel() else 0
    column = keep.long().cumsum(1) - 1 + ((width - lengths)[:, None] if left else 0)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(column)
    source = torch.arange(keep.shape[1], device=keep.device).expand_as(column)
    kept = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    kept[rows[keep], column[keep]] = source[keep]
    return kept


def image_rows(placeholder: Tensor, counts: Tensor) -> Tensor:
    """Row of each image: the row holding its first placeholder."""
    starts = torch.cumsum(counts, 0) - counts
    flat_rows = placeholder.nonzero()[:, 0]
    return flat_rows[starts]


def pad_id(model: nn.Module, *special: int) -> int:
    """A padding id for a compacted prompt: the model's own, unless it is one of the ``special`` (placeholder) ids."""
    for pad in (getattr(model.generation_config, "pad_token_id", None),
                getattr(model.config.text_config, "pad_token_id", None), 0, 1, 2):
        if isinstance(pad, int) and pad not in special:
            return pad
    raise ValueError(f"no padding id outside the placeholder ids {special}")


def row_queries(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, placeholder: Tensor, rows: Tensor,
                given: Optional[Tensor]) -> list[Tensor]:
    """Per image ``[1, Q, D]`` (``rows``: the prompt row of each): the language model's input embeddings of
    its row's text tokens (``placeholder`` marks the visual ones), or the row's query from
    ``vtr.conditioned(model, query)`` (``[B, D]`` / ``[B, Q, D]``, one row per prompt)."""
    if given is not None:
        if given.shape[0] != input_ids.shape[0]:
            raise ValueError(f"vtr.conditioned: query must have one row per prompt ({input_ids.shape[0]}), "
                             f"got {tuple(given.shape)}")
        return [given[row][None].to(model.dtype) for row in rows.tolist()]
    text = attention_mask.bool() & ~placeholder
    embed = model.get_input_embeddings()
    queries = []
    for row in rows.tolist():
        tokens = input_ids[row][text[row]]
        if tokens.numel() == 0:
            raise ValueError(f"query-conditioned reduction needs text in the prompt; row {row} has only image tokens")
        queries.append(embed(tokens)[None])
    return queries


def item_queries(model: nn.Module, reducer, items: list, input_ids: Tensor, attention_mask: Tensor,
                 placeholder: Tensor, given: Optional[Tensor]) -> Optional[list[Tensor]]:
    """Per item (image or tile: ``item.row`` its prompt row), its row's query (:func:`row_queries`) where the reducer
    reads one (``Need.QUERY``); None otherwise."""
    if Need.QUERY not in reducer.needs:
        return None
    rows = torch.tensor([item.row for item in items], dtype=torch.long)
    return row_queries(model, input_ids, attention_mask, placeholder, rows, given)


def with_callers_prompt(output, input_ids: Tensor, compact_length: int):
    """generate() output with the caller's prompt in front of the new tokens (not the compacted one)."""
    sequences = output if isinstance(output, Tensor) else output.sequences
    repeat = sequences.shape[0] // input_ids.shape[0]   # num_return_sequences / beams
    prompt = input_ids.repeat_interleave(repeat, dim=0).to(sequences.device)
    restored = torch.cat([prompt, sequences[:, compact_length:]], dim=1)
    if isinstance(output, Tensor):
        return restored
    output.sequences = restored
    return output
