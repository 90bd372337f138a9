"""What in-LLM pruning needs to know of a family's prompts: its images and videos as :class:`Item` s (where their
placeholders sit, their grids), told by the family's :class:`Visuals` (``vtr.adapters.llava.in_llm``,
``vtr.adapters.qwen_vl.in_llm``, ``vtr.adapters.llava.video``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor, nn

from .report import VlmReport
from .run import VlmRun


@dataclass
class Item:
    """One image (or video) of a prompt: its placeholders and, if its tokens form one, its patch grid."""

    row: int
    columns: Tensor                 # [n] prompt column of each of its placeholders, in order
    grid: Optional[tuple] = None    # (rows, cols) while the tokens are its untouched patches in raster order
    kind: str = "image"             # or "video"
    video_grid: Optional[tuple] = None   # a video's (frames, rows, cols): its tokens frame after frame, then any newline


class Visuals:
    """What in-LLM pruning needs to know of a family's prompts; a family subclasses it (settings only: a
    plain object, so a patched model pickles). ``report_kind`` is the family's report class."""

    report_kind: type = VlmReport
    where_suffix: str = ""
    pruning_kind: Optional[type] = None   # a subclass of ``vtr.adapters.vlm.pruning.Pruning`` (default: that class)

    def tokens(self, model: nn.Module) -> tuple[int, int]:
        """(most visual tokens one image can have, protected leading tokens per image)."""
        raise NotImplementedError

    def placeholder(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """``[B, L]`` True at the prompt's visual tokens."""
        raise NotImplementedError

    def items(self, model: nn.Module, input_ids: Tensor, arguments: dict, run: VlmRun) -> list[Item]:
        """The prompt's images and videos, in the order transformers fills their placeholders (``arguments``:
        the forward's; ``run``: the call's, which may hold what ``generate()`` was given)."""
        raise NotImplementedError

    def check_generate(self, model: nn.Module, kwargs: dict) -> None:
        """Refuse a generate() call's inputs before anything runs."""

    def report_fields(self, items: list[Item]) -> dict:
        """The family's own fields of the report."""
        return {}


class TiledVisuals(Visuals):
    """Prompts of ``image_token_id`` placeholders, tile after tile, each tile the model's fixed count of tokens over
    its square grid (InternVL, SmolVLM / Idefics3): a family sets ``report_kind`` and its ``tile_tokens(model)`` and
    ``tile_grid(model)`` (``(1, rows, cols)``)."""

    tile_tokens: Callable[[nn.Module], int]
    tile_grid: Callable[[nn.Module], tuple]

    def tokens(self, model: nn.Module) -> tuple[int, int]:
        return self.tile_tokens(model), 0

    def placeholder(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        return input_ids == model.config.image_token_id

    def items(self, model: nn.Module, input_ids: Tensor, arguments: dict, run: VlmRun) -> list[Item]:
        per_tile = self.tile_tokens(model)
        found = int(self.placeholder(model, input_ids).sum())
        if found % per_tile:
            raise ValueError(f"the prompt has {found} image tokens, not a whole number of tiles of {per_tile}")
        count = found // per_tile
        return split_placeholders(self.placeholder(model, input_ids), [per_tile] * count,
                                  [self.tile_grid(model)[1:]] * count)


def split_placeholders(placeholder: Tensor, counts: list[int], grids: Optional[list] = None,
                       kind: str = "image", video_grids: Optional[list] = None) -> list[Item]:
    """Items of ``counts`` tokens each, filling ``placeholder`` in row-major order, item after item
    (``video_grids``: each video's (frames, rows, cols), for the report's grids and tokens per frame)."""
    rows, columns = placeholder.nonzero(as_tuple=True)
    if sum(counts) != rows.numel():
        raise ValueError(f"the prompt has {rows.numel()} {kind} tokens but its {len(counts)} {kind}s give "
                         f"{sum(counts)} features")
    grids = grids or [None] * len(counts)
    video_grids = video_grids or [None] * len(counts)
    return [Item(int(r[0]), c, grid, kind, v)
            for r, c, grid, v in zip(rows.split(counts), columns.split(counts), grids, video_grids)]
