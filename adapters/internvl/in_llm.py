"""In-LLM pruning on InternVL (``layers=[K]`` or ``[K1, K2, ...]``): the shared machinery of
``vtr.adapters.vlm.in_llm``, told what its prompts look like: ``image_token_id`` placeholders, tile after tile
(the thumbnail last), each tile the model's fixed count of tokens over its square grid. Each tile (the thumbnail
included) keeps ``min(budget, its count)`` after the last stage."""
from __future__ import annotations

from ..vlm.visuals import TiledVisuals
from .common import InternVLReport, tile_grid, tile_tokens


class InternVLVisuals(TiledVisuals):
    """InternVL prompts: tiles of one count each (the thumbnail last)."""

    report_kind = InternVLReport
    tile_tokens = staticmethod(tile_tokens)
    tile_grid = staticmethod(tile_grid)
