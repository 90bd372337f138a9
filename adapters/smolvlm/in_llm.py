"""In-LLM pruning on SmolVLM / Idefics3 (``layers=[K]`` or ``[K1, K2, ...]``): the shared machinery of
``vtr.adapters.vlm.in_llm``, told what their prompts look like: ``image_token_id`` placeholders, tile after tile,
each tile the model's fixed count of tokens over its square grid. Each tile (the global view included) keeps
``min(budget, its count)`` after the last stage."""
from __future__ import annotations

from torch import Tensor, nn

from ..vlm.run import VlmRun
from ..vlm.visuals import Item, Visuals, split_placeholders
from .common import SmolVLMReport, tile_grid, tile_tokens


class SmolVLMVisuals(Visuals):
    """SmolVLM / Idefics3 prompts: tiles of one count each."""

    report_kind = SmolVLMReport

    def tokens(self, model: nn.Module) -> tuple[int, int]:
        return tile_tokens(model), 0

    def placeholder(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        return input_ids == model.config.image_token_id

    def items(self, model: nn.Module, input_ids: Tensor, arguments: dict, run: VlmRun) -> list[Item]:
        per_tile = tile_tokens(model)
        found = int(self.placeholder(model, input_ids).sum())
        if found % per_tile:
            raise ValueError(f"the prompt has {found} image tokens, not a whole number of tiles of {per_tile}")
        count = found // per_tile
        return split_placeholders(self.placeholder(model, input_ids), [per_tile] * count,
                                  [tile_grid(model)[1:]] * count)
