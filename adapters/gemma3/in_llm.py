"""In-LLM pruning on Gemma 3 (``layers=[K]`` or ``[K1, K2, ...]``): the shared machinery of
``vtr.adapters.vlm.in_llm``, with the masks Gemma 3 was trained with rebuilt for the shorter sequence.

Gemma 3's language model gives each decoder layer one of two masks: full-attention layers see every earlier token,
sliding-window (local) layers only the last ``config.sliding_window`` slots; on both, the tokens of one image (a
run of ``token_type_ids`` 1) also see each other both ways, later ones included. Each layer type has its own rotary
table too. The shared machinery hands every layer past the pruning one causal mask and one rotary table, which
would make a reduced image causal and the local layers global; so here, for each layer from the first stage on:

- the mask is rebuilt by the layer's own type over the sequence it sees (its segment's slots, the KV cache's slots
  at a decode step): a key slot is visible to a query slot when it is real and earlier (causal), or when both hold
  tokens of the same image (bidirectional); on a local layer also only when it is one of the query's last
  ``sliding_window`` slots. That is what transformers builds for the pruned sequence itself (the reference the tests
  run: the unpatched model on the kept tokens, with their token types): the window counts the tokens a layer holds,
  as its sliding KV cache does (it keeps the last ``sliding_window - 1`` slots of the pruned sequence);
- the rotary embeddings are the layer type's own table at the kept tokens' original positions;
- the last prompt token's attention that ranks the image tokens is the one the stage layer computes: on a local
  layer, over its window only (image tokens beyond it get 0: prune at a full-attention layer, or one whose window
  covers the images, for a ranking by attention).

The images come from the ``token_type_ids`` of the call (checked against the placeholders); a call without them
gets the model's own masks without the bidirectional part, as the unpatched model does. Each image keeps
``min(budget, mm_tokens_per_image)`` after the last stage.
"""
from __future__ import annotations

import bisect
from typing import Optional

import torch
from torch import Tensor, nn

from ..vlm.pruning import Pruning
from ..vlm.run import VlmRun
from ..vlm.sequence import additive, gather_slots
from ..vlm.visuals import TiledVisuals
from .common import Gemma3Report, image_grid, image_tokens, token_types


def image_blocks(token_type_ids: Tensor) -> Tensor:
    """``[B, L]`` index of the image each column belongs to (a run of type 1 is one image), -1 elsewhere: the
    groups Gemma 3's mask lets see each other both ways."""
    image = token_type_ids == 1
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    return torch.where(image, starts.long().cumsum(1) - 1, -1)


def gemma3_mask(valid: Tensor, blocks: Tensor, cache, layer: int, query_length: int, window: Optional[int],
                dtype: torch.dtype) -> Tensor:
    """Additive mask ``[B, 1, Q, W]`` of the last ``query_length`` slots of a sequence whose first slots are
    ``valid`` (real) and ``blocks`` (image index or -1), ``[B, S]``; slots past ``S`` are real text (tokens
    generated since). Keys are the slots layer ``layer`` of ``cache`` returns (its ``get_mask_sizes``: a sliding
    cache's offset, a static cache's width); ``window``: a local layer's sliding window."""
    past = int(cache.get_seq_length(layer)) if cache is not None else 0
    width, offset = cache.get_mask_sizes(query_length, layer) if cache is not None else (past + query_length, 0)
    keys = offset + torch.arange(int(width), device=valid.device)
    queries = past + torch.arange(query_length, device=valid.device)

    def at(values: Tensor, slots: Tensor, fill) -> Tensor:
        out = torch.full((values.shape[0], slots.shape[0]), fill, dtype=values.dtype, device=values.device)
        inside = slots < values.shape[1]
        out[:, inside] = values[:, slots[inside]]
        return out

    key_block, query_block = at(blocks, keys, -1)[:, None, :], at(blocks, queries, -1)[:, :, None]
    allowed = (keys[None, :] <= queries[:, None])[None] | ((key_block == query_block) & (query_block >= 0))
    allowed = allowed & at(valid, keys, True)[:, None, :]
    if window is not None:
        allowed = allowed & (keys[None, :] > queries[:, None] - window)[None]
    return additive(allowed, dtype)


class Gemma3Pruning(Pruning):
    """:class:`~vtr.adapters.vlm.pruning.Pruning` with Gemma 3's masks and rotary tables per layer type."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.blocks: Optional[Tensor] = None   # [B, L] image of each prompt column (-1: text, padding)
        self.masks: dict = {}                  # (stage, local) -> this forward's mask

    def observe(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], cache, arguments: dict,
                run: VlmRun) -> None:
        super().observe(input_ids, attention_mask, cache, arguments, run)
        self.masks = {}
        if self.placeholder is not None and self.stage_columns[0] is None:    # a new prompt's prefill
            given = arguments.get("token_type_ids")
            image = self.model.config.image_token_id
            self.blocks = (image_blocks(token_types(input_ids, given, image)) if given is not None
                           else torch.full_like(input_ids, -1))

    def _window(self, layer: nn.Module) -> Optional[int]:
        return layer.self_attn.sliding_window

    def layer(self, stage: Optional[int], module: nn.Module, args: tuple, kwargs: dict):
        if self.placeholder is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1 and not self.replaying and self.stage_columns[-1] is not None:
            # A decode step: the new token is text, causal over the segment's cache (windowed on local layers).
            index = bisect.bisect_right(self.stages.layers, module.self_attn.layer_idx) - 1
            kwargs["attention_mask"] = self._mask(module, index, self.stage_columns[index], kwargs, 1, hidden.dtype)
            return args, kwargs
        if "position_embeddings" in self.shared:   # a shorter sequence already: this layer type's own rotary table
            cos, sin = kwargs["position_embeddings"]
            index = self.columns.clamp_min(0)
            self.shared["position_embeddings"] = (gather_slots(cos, index), gather_slots(sin, index))
        args, kwargs = super().layer(stage, module, args, kwargs)
        index = bisect.bisect_right(self.stages.layers, module.self_attn.layer_idx) - 1
        kwargs["attention_mask"] = self._mask(module, index, self.columns, kwargs, self.columns.shape[1],
                                              hidden.dtype)
        return args, kwargs

    def _mask(self, module: nn.Module, stage: int, columns: Tensor, kwargs: dict, query_length: int,
              dtype: torch.dtype) -> Tensor:
        """The mask of ``module``'s type over the sequence of ``columns`` (prompt columns of its slots, -1 padding;
        columns past the prompt: new tokens), shared by the stage's layers of that type in this forward."""
        window = module.self_attn.sliding_window
        key = (stage, window is not None)
        if key not in self.masks:
            prompt = self.blocks.shape[1]
            inside = (columns >= 0) & (columns < prompt)
            blocks = torch.where(inside, self.blocks.gather(1, columns.clamp(0, prompt - 1)), -1)
            self.masks[key] = gemma3_mask(columns >= 0, blocks, kwargs.get("cache"), module.self_attn.layer_idx,
                                          query_length, window, dtype)
        return self.masks[key]


class Gemma3Visuals(TiledVisuals):
    """Gemma 3 prompts: images of ``mm_tokens_per_image`` tokens each (a square grid), one run of placeholders
    each between ``<start_of_image>`` and ``<end_of_image>``."""

    report_kind = Gemma3Report
    pruning_kind = Gemma3Pruning
    tile_tokens = staticmethod(image_tokens)
    tile_grid = staticmethod(image_grid)


__all__ = ["Gemma3Pruning", "Gemma3Visuals", "gemma3_mask", "image_blocks"]
