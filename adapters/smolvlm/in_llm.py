"""In-LLM pruning on SmolVLM / Idefics3 (``layers=[K]`` or ``[K1, K2, ...]``): the shared machinery of
``vtr.adapters.vlm.in_llm``, told what their prompts look like: ``image_token_id`` placeholders, tile after tile,
each tile the model's fixed count of tokens over its square grid. Each tile (the global view included) keeps
``min(budget, its count)`` after the last stage."""
from __future__ import annotations

from ..vlm.visuals import TiledVisuals
from .common import SmolVLMReport, tile_grid, tile_tokens


class SmolVLMVisuals(TiledVisuals):
    """SmolVLM / Idefics3 prompts: tiles of one count each (the global view last)."""

    report_kind = SmolVLMReport
    tile_tokens = staticmethod(tile_tokens)
    tile_grid = staticmethod(tile_grid)
