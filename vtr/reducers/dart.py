"""Duplication-aware pruning inside the language model (DART: Wen et al., "Stop Looking for Important Tokens in
Multimodal Language Models: Duplication Matters More", arXiv 2502.11494; code github.com/ZichenWen1/DART).

At one decoder layer (K = 2, the official scripts' ``--pruned_layer 2``) a few *pivot* tokens are picked: the
image tokens and the instruction tokens (the prompt's text after the image) whose attention keys have the
largest L1 norm (4 + 4: ``--pivot_image_token 4 --pivot_text_token 4``). Each pivot then takes the image tokens
least similar to it (cosine of the hidden states after the language model's final norm, as the code compares
them): the kept tokens are the image pivots and what the pivots took, so near-duplicates of a pivot go.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import Reducer, Signals, check_number, register
from .select import check_fuse, check_signal, fused_dest, fusion_macs, keep_first, num_chosen, real_tokens


@register
class DART(Reducer):
    """Keep the image pivots and, for each pivot in turn, the remaining image tokens least similar to it.

    pivots: the ``pivot_image`` image tokens and ``pivot_text`` instruction tokens (``signals.instruction``) with
    the largest L1 norm of their keys (``signals.keys``) at the pruning layer. The budget is exact: of ``num_kept``
    tokens, the image pivots are kept, and the rest, ``R``, is shared by the pivots in order (image pivots by
    position, then text pivots by position), each taking ``R // P`` and the first ``R % P`` one more. The
    official code takes ``max_num_trunction // P`` per pivot and keeps the image pivots on top (132 tokens for
    ``--max_num_trunction 128``); ``budget=132`` here is that setting. The official code visits its pivots in
    the order of a Python set; here they go in prompt order. It reads the keys the layer before K returned
    (its attention's side output); vtr computes them with layer K's own projections from the hidden states
    entering layer K (the states DART compares). Similarity is the cosine of the hidden states after the
    language model's final norm (``instruction.norm``), as the official code. A row with fewer instruction tokens
    uses those it has; without ``signals.instruction`` only image pivots serve. ``fuse`` (default ``"drop"``, as
    published) says what happens to the tokens not kept.
    """

    name = "dart"
    description = "keep pivot tokens (largest key norms) and the tokens least duplicated by them, in the LM (DART)"
    paper = "Wen et al. 2025, arXiv 2502.11494"
    stages = ("in_lm",)
    needs = frozenset({"metric", "keys", "instruction"})
    published_fuse = "drop"
    max_step = 1.0

    def __init__(self, pivot_image: int = 4, pivot_text: int = 4, fuse: str = "drop"):
        super().__init__()
        self.pivot_image = check_number(self, "pivot_image", pivot_image, "an integer >= 1 (image pivots)",
                                        lambda n: n >= 1, integer=True)
        self.pivot_text = check_number(self, "pivot_text", pivot_text, "an integer >= 0 (instruction pivots)",
                                       lambda n: n >= 0, integer=True)
        self.fuse = check_fuse(self, fuse)

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return [min(2, num_layers - 1)]     # DART's K = 2 (of 32 on LLaVA-1.5, of 28 on Qwen2.5-VL-7B)

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        """Each pivot's cosine with every image token (P U d); the keys come with the layer's scoring."""
        kept = (num_tokens + cost.num_protected) // 2 if num_kept is None else num_kept
        pivots = self.pivot_image + self.pivot_text
        return float(pivots * (num_tokens - cost.num_protected) * cost.metric_dim) + \
            fusion_macs(num_tokens, kept, cost, self.fuse)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        if signals.metric is None or signals.keys is None:
            raise ValueError("dart needs signals.metric (hidden states) and signals.keys (attention keys): it acts "
                             "inside a language model (layers=)")
        protected = state.num_protected
        check_signal(self, "metric", signals.metric, state)
        keys = check_signal(self, "keys", signals.keys, state)[:, protected:].float()
        valid = real_tokens(state)
        instruction = signals.instruction
        norm = (lambda x: x) if instruction is None or instruction.norm is None else instruction.norm
        features = unit_rows(norm(signals.metric[:, protected:]).float())
        k = num_chosen(state, num_kept, self.fuse)

        # image pivots: largest key L1 norms among the real tokens (ties: the earlier position), in position order
        image_pivots = keep_first(keys.abs().sum(-1).masked_fill(~valid, float("-inf")), min(self.pivot_image, k))
        image_pivots = image_pivots.masked_fill(~valid.gather(1, image_pivots), -1)
        pivot_features = [features.gather(1, image_pivots.clamp_min(0)[..., None].expand(-1, -1, features.shape[-1]))]
        pivot_valid = [image_pivots >= 0]
        if instruction is not None and self.pivot_text > 0 and instruction.hidden.shape[1] > 0:
            if instruction.keys is None:
                raise ValueError("dart needs signals.instruction.keys (the text tokens' attention keys)")
            text_norms = instruction.keys.float().abs().sum(-1).masked_fill(~instruction.valid, float("-inf"))
            text_pivots = keep_first(text_norms, min(self.pivot_text, text_norms.shape[1]))
            text_features = unit_rows(norm(instruction.hidden).float())
            pivot_features.append(text_features.gather(1, text_pivots[..., None].expand(-1, -1, features.shape[-1])))
            pivot_valid.append(instruction.valid.gather(1, text_pivots))
        pivots, live = torch.cat(pivot_features, dim=1), torch.cat(pivot_valid, dim=1)   # [B, P, d], [B, P]

        chosen = torch.zeros_like(valid)
        rows = torch.arange(chosen.shape[0], device=chosen.device)[:, None]
        chosen[rows.expand_as(image_pivots)[image_pivots >= 0], image_pivots[image_pivots >= 0]] = True
        share = shares(k - chosen.sum(dim=1), live)                                  # [B, P] tokens per pivot
        similarity = pivots @ features.transpose(1, 2)                               # [B, P, U]
        for p in range(pivots.shape[1]):
            # least similar first; the chosen and padding never (ties: the earlier position)
            score = (-similarity[:, p]).masked_fill(chosen | ~valid, float("-inf"))
            order = score.argsort(dim=1, descending=True, stable=True)
            rank = order.argsort(dim=1)
            chosen = chosen | ((rank < share[:, p:p + 1]) & valid & ~chosen)
        kept = keep_first(chosen.float() * 2 + valid.float(), k)
        return state.reduce(fused_dest(state, kept, num_kept, self.fuse, signals.metric), num_kept)


def unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def shares(remaining: Tensor, live: Tensor) -> Tensor:
    """``[B, P]``: ``remaining`` ``[B]`` tokens split over each row's live pivots in order, ``R // P`` each and one
    more for the first ``R % P``; 0 for pivots a row does not have."""
    count = live.sum(dim=1).clamp_min(1)
    base, extra = remaining.clamp_min(0) // count, remaining.clamp_min(0) % count
    order = live.long().cumsum(dim=1) - 1                      # index of each live pivot among the row's live ones
    return torch.where(live, base[:, None] + (order < extra[:, None]).long(), torch.zeros_like(order))
