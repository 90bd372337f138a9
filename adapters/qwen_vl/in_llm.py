"""In-LLM pruning on Qwen-VL (``layers=[K]`` or ``[K1, K2, ...]``): the shared machinery of
``vtr.adapters.vlm.in_llm``, told what a Qwen-VL prompt looks like.

Images fill the ``image_token_id`` placeholders one after another, videos the ``video_token_id`` ones;
each has ``t * (h/2) * (w/2)`` tokens by its ``*_grid_thw``, an image's forming a ``(h/2) x (w/2)``
grid. ``generate()`` pre-encodes the images and drops the grids before its forwards, so the patched
``generate`` keeps them in the call's run. Positions need nothing of vtr: the language model computes
its M-RoPE embeddings for the whole prompt (transformers' own ``get_rope_index``) before layer K, and
the layers from K on see each kept token's own; a merged token takes those of the first token it carries.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from vtr.budget.visual import stage_layers
from vtr.core.plan import Reduction

from ..vlm.visuals import Item, Visuals, split_placeholders
from ..vlm.run import VlmRun
from .common import QwenVLReport, merge_size, reference_tokens

class QwenVisuals(Visuals):
    """Qwen-VL's prompts: images, then videos, each of its grid's own count."""

    report_kind = QwenVLReport

    def tokens(self, model: nn.Module) -> tuple[int, int]:
        return reference_tokens(model), 0

    def placeholder(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)

    def items(self, model: nn.Module, input_ids: Tensor, arguments: dict, run: VlmRun) -> list[Item]:
        items = []
        for kind, token in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
            placeholder = input_ids == token
            if not bool(placeholder.any()):
                continue
            grids = arguments.get(f"{kind}_grid_thw")
            grids = grids.tolist() if grids is not None else _expanded(run.vision.get(kind), input_ids.shape[0])
            if grids is not None:
                merge = merge_size(model)
                shapes = [(t, h // merge, w // merge) for t, h, w in grids]
                counts = [t * h * w for t, h, w in shapes]
                spatial = [(h, w) if t == 1 else None for t, h, w in shapes]
                videos = shapes if kind == "video" else None
            else:   # pre-encoded features without their grids: counts only
                encoded = (arguments.get("mm_encoder_outputs") or {}).get(kind)
                if encoded is None:
                    raise ValueError(f"in-LLM pruning on Qwen-VL needs {kind}_grid_thw with the {kind}s (as the "
                                     "processor returns it): each image's token count comes from it")
                counts, spatial, videos = [len(f) for f in encoded.pooler_output], None, None
            items += split_placeholders(placeholder, counts, spatial, kind, videos)
        return items

    def check_generate(self, model: nn.Module, kwargs: dict) -> None:
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if kwargs.get(pixels) is not None and kwargs.get(grid) is None:
                raise ValueError(f"{grid} is needed with {pixels} (as the processor returns it)")

    def report_fields(self, items: list[Item]) -> dict:
        return {"kinds": [item.kind for item in items],
                "grids": [item.video_grid or (None if item.grid is None else (1, *item.grid)) for item in items]}


def check_deepstack(model: nn.Module, reduction: Reduction) -> None:
    """Qwen3-VL adds DeepStack features (from several tower layers) to the visual tokens' hidden states after each
    of its first language-model layers, at the prompt's placeholders: pruning must start after the last of them."""
    levels = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())
    first = stage_layers(reduction.visual.layers, len(model.model.language_model.layers))[0]
    if first < levels:
        raise ValueError(f"layers= on Qwen3-VL must be >= {levels}: DeepStack adds tower features to the visual "
                         f"tokens after each of the first {levels} language-model layers, so in-LLM pruning starts "
                         f"after them (got layer {first}); or reduce before the language model (no layers=), where "
                         "every DeepStack level keeps the same tokens")


def remember(run: VlmRun, model: nn.Module, inputs: Optional[Tensor], kwargs: dict) -> None:
    """Keep each prompt row's grids in the call's run: ``generate()`` hands its forwards the images pre-encoded,
    without their grids, and with beams or several sequences per prompt every row repeated."""
    input_ids = kwargs.get("input_ids") if inputs is None else inputs
    if input_ids is None:
        return
    merge = merge_size(model)
    for kind, token in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
        grids = kwargs.get(f"{kind}_grid_thw")
        if grids is None:
            continue
        grids, rows, next_grid = grids.tolist(), [], 0
        for placeholders in (input_ids == token).sum(1).tolist():
            own = []
            while placeholders > 0 and next_grid < len(grids):
                t, h, w = grids[next_grid]
                own.append(grids[next_grid])
                placeholders -= t * (h // merge) * (w // merge)
                next_grid += 1
            rows.append(own)
        run.vision[kind] = rows


def _expanded(rows: Optional[list], batch: int) -> Optional[list]:
    """The grids of a batch whose rows are the remembered rows each repeated ``batch / rows`` times, as
    ``generate()`` repeats them (and their images: ``[A, B] -> [A, B, A, B]`` per row)."""
    if rows is None or not rows or batch % len(rows):
        return None
    repeat = batch // len(rows)
    return [grid for row in rows for _ in range(repeat) for grid in row]
