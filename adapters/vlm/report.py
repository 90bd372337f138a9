"""What the last call of a patched vision-language model really kept (detached, per thread)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.core.run import Report

from .language import prefill_macs


@dataclass
class VlmReport(Report):
    """What the last call really kept (a :class:`vtr.Report` whose batch dimension is the images).

    tokens: visual tokens per image entering each reduction step, then the count kept.
    stage_layers / stage_tokens: in-LLM pruning only: the decoder layer of each stage, and the visual
        tokens per image entering the first stage, then kept after each stage (``tokens`` lists
        every reducer step; a stage takes several when the reducer's ``max_step`` is below 1).
        When the images have different counts, both give the most any image had or kept
        (``tokens`` equals ``stage_tokens``); ``image_tokens_before/after`` give each image's.
    stage_positions: in-LLM pruning only: per stage, ``[B, L_i]`` index in the caller's prompt of each
        position the layers from that stage on see, -1 for padding (the last one is ``kept_positions``).
    assignment / size: per image, as in :class:`vtr.Report` (merged tokens have size > 1), padded with -1
        past an image's own token count and with 0 past its kept count when images differ.
    image_rows: ``[I]`` prompt row of each image.
    visual_tokens_before / visual_tokens_after: ``[B]`` placeholders per row in the caller's prompt
        and in the compacted prompt the language model saw (text-only rows: 0 and 0).
    kept_positions: ``[B, L']`` index in the caller's prompt of each column of the compacted prompt,
        -1 for padding; ``forward()`` logits follow these columns.
    prefill_macs / prefill_macs_unreduced: ``[B]`` analytic language-model prefill MACs per row,
        with and without the reduction (real tokens only; the vision tower is unchanged).
    reducer_macs: MACs of the reducer's own decisions for the whole batch.
    image_tokens_before / image_tokens_after: ``[I]`` visual tokens of each image before and after.
    kinds / grids / frame_tokens (families with videos: Qwen-VL, LLaVA-OneVision, LLaVA-NeXT-Video): per image or
        video, ``"image"`` or ``"video"``; (frames, rows, cols) of its tokens (None: no grid); the tokens it kept from
        each frame (a token merged across frames counts in its first). The images come first, then the videos.
    """

    where: str = ""
    image_rows: Optional[Tensor] = None
    visual_tokens_before: Optional[Tensor] = None
    visual_tokens_after: Optional[Tensor] = None
    kept_positions: Optional[Tensor] = None
    prefill_macs: Optional[Tensor] = None
    prefill_macs_unreduced: Optional[Tensor] = None
    reducer_macs: float = 0.0
    stage_layers: Optional[list] = None
    stage_tokens: Optional[list] = None
    stage_positions: Optional[list] = None
    image_tokens_before: Optional[Tensor] = None
    image_tokens_after: Optional[Tensor] = None
    kinds: list = field(default_factory=list)
    grids: list = field(default_factory=list)
    frame_tokens: list = field(default_factory=list)

    @property
    def prefill_flops_saved(self) -> float:
        """Fraction of the batch's analytic language-model prefill MACs the reduction removed."""
        unreduced = float(self.prefill_macs_unreduced.sum())
        return 1.0 - (float(self.prefill_macs.sum()) + self.reducer_macs) / unreduced


def text_only_report(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], where: str,
                     kind: type = VlmReport) -> VlmReport:
    """Report (of class ``kind``) of a call without images: nothing to reduce, every row passes through untouched."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    zeros = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    real = mask.sum(1)
    columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return kind(
        tokens=[], assignment=torch.zeros(0, 0, dtype=torch.long), size=torch.zeros(0, 0), num_protected=0,
        where=where, image_rows=zeros[:0], visual_tokens_before=zeros, visual_tokens_after=zeros,
        kept_positions=columns.masked_fill(mask == 0, -1), prefill_macs=prefill_macs(model, real),
        prefill_macs_unreduced=prefill_macs(model, real),
    )
