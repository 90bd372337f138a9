"""In-LLM visual token pruning for LLaVA (FastV-style): layers >= K run on the kept tokens only.

At decoder layer K of the prefill, the attention the last prompt token pays to every token is
recomputed from the layer's own ``input_layernorm``, ``q_proj``/``k_proj`` and rotary embedding
(one query row: O(L d), and it works whatever kernel the layer uses: SDPA, eager, ...). It is
given to the reducer as the ``cls_attention`` signal of each image's tokens (the hidden states are
the metric), and the reducer decides per image what stays. Layers >= K then see the kept
sequence: hidden states, rotary embeddings and position ids gathered (original positions kept,
a merged token takes the position of the first token it carries) and a causal mask rebuilt for
it. Their KV cache is therefore short; at each decode step those layers get a mask aligned with
their own cache (rows of a batch may have kept different numbers of tokens), while layers < K use
the model's own mask and full cache.

Forward pre-hooks on the decoder layers do all of it; the model's forward and ``generate()`` run
unchanged. Needs the last column of the prompt to be a real token (left padding, as generate wants).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.config import Reduction
from vtr.signals import cls_attention

from .llava import LlavaReport, _reduce, image_tokens, kept_columns, prefill_macs, text_only_report


class LanguageModelPruning:
    """The hooks on decoder layers K.. and what they share within one generate() call."""

    def __init__(self, model: nn.Module, reduction: Reduction, layer: int):
        self.model, self.reduction, self.layer = model, reduction, layer
        self.placeholder: Optional[Tensor] = None   # [B, L] image tokens of the prompt being prefilled
        self.mask2d: Optional[Tensor] = None
        self.columns: Optional[Tensor] = None       # [B, L'] prompt column of each kept slot, -1 padding
        self.shared: dict = {}                      # what layers > K reuse in the current forward
        layers = model.model.language_model.layers
        self.handles = [layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i in range(layer, len(layers))]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def observe(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor]) -> None:
        """Called by the patched forward: a prompt with image tokens starts a new pruning."""
        if input_ids is None:
            raise ValueError("in-LLM pruning on a vtr-patched LLaVA needs input_ids (to find the image tokens)")
        if input_ids.shape[1] == 1 and self.columns is not None:
            return                                   # a decode step of the current prompt
        placeholder = input_ids == self.model.config.image_token_id
        self.placeholder = placeholder if bool(placeholder.any()) else None
        self.mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.columns = None
        if self.placeholder is None:
            where = f"in the language model at layer {self.layer}"
            self.reduction.report = text_only_report(self.model, input_ids, attention_mask, where)
        if self.placeholder is not None and not bool(self.mask2d[:, -1].all()):
            raise ValueError("in-LLM pruning needs the last column of the prompt to be a real token in every row "
                             "(pad on the left, as generate() expects)")

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            if self.placeholder is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == self.layer:
                if hidden.shape[1] > 1:
                    if self.columns is not None:
                        raise NotImplementedError("in-LLM pruning supports one prefill then one token per step")
                    hidden = self._prune(module, hidden, kwargs)
                else:
                    self._decode_mask(kwargs, hidden)
            kwargs.update(self.shared)
            args = (hidden,) + tuple(args[1:]) if args else args
            if not args:
                kwargs["hidden_states"] = hidden
            return args, kwargs
        return hook

    def _prune(self, layer: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
        batch, length, _ = hidden.shape
        cos, sin = kwargs["position_embeddings"]
        real = self.mask2d.bool()
        scores = last_token_attention(layer, hidden, cos, sin, real)           # [B, L]

        # Each image's tokens as one row of a token state (transformers' row-major placeholder order).
        per_image, protected = image_tokens(self.model)
        rows, cols = self.placeholder.nonzero(as_tuple=True)
        rows, cols = rows.view(-1, per_image), cols.view(-1, per_image)
        state, tokens, reducer_macs = _reduce(self.model, self.reduction, hidden[rows, cols], scores[rows, cols], None)

        # Where each output token sits: the first prompt column it carries.
        first = torch.full(state.size.shape, length, dtype=torch.long, device=hidden.device)
        carried = state.assignment >= 0
        first.scatter_reduce_(1, state.assignment.clamp_min(0), torch.where(carried, cols, length), "amin")
        out_rows = rows[:, :1].expand_as(first)
        keep = real & ~self.placeholder
        keep[out_rows, first] = True
        hidden = hidden.clone()
        hidden[out_rows, first] = state.x.to(hidden.dtype)

        self.columns = kept_columns(keep, left=True)
        index = self.columns.clamp_min(0)
        valid = self.columns >= 0
        gathered = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        position_ids = kwargs["position_ids"].expand(batch, length).gather(1, index)
        cos = cos.expand(batch, -1, -1).gather(1, index[..., None].expand(-1, -1, cos.shape[-1]))
        sin = sin.expand(batch, -1, -1).gather(1, index[..., None].expand(-1, -1, sin.shape[-1]))
        causal = torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool, device=valid.device).tril()
        self.shared = {
            "position_ids": position_ids,
            "position_embeddings": (cos, sin),
            "attention_mask": _additive(causal[None] & valid[:, None, :], hidden.dtype),
        }
        self._record(state, tokens, reducer_macs, keep)
        return gathered

    def _decode_mask(self, kwargs: dict, hidden: Tensor) -> None:
        """Mask of one new token over this layer's own (shorter) cache: kept slots, then generated tokens."""
        cache = kwargs.get("cache")
        past = cache.get_seq_length(self.layer) if cache is not None else 0
        valid = self.columns >= 0
        generated = torch.ones(valid.shape[0], past - valid.shape[1] + hidden.shape[1], dtype=torch.bool,
                               device=valid.device)
        self.shared = {"attention_mask": _additive(torch.cat([valid, generated], 1)[:, None, :], hidden.dtype)}

    def _record(self, state, tokens: list[int], reducer_macs: float, keep: Tensor) -> None:
        real = self.mask2d.bool()
        kept_images = keep & self.placeholder
        before, after = real.sum(1), keep.sum(1)
        self.reduction.report = LlavaReport(
            tokens=tokens, assignment=state.assignment.detach(), size=state.size.detach(),
            num_protected=state.num_protected, grid=None, where=f"in the language model at layer {self.layer}",
            image_rows=self.placeholder.nonzero()[:, 0].view(-1, tokens[0])[:, 0],
            visual_tokens_before=self.placeholder.sum(1), visual_tokens_after=kept_images.sum(1),
            kept_positions=self.columns,
            prefill_macs=prefill_macs(self.model, before, after, self.layer),
            prefill_macs_unreduced=prefill_macs(self.model, before),
            reducer_macs=reducer_macs + _scoring_macs(self.model, self.layer, before),
        )


def last_token_attention(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, real: Tensor) -> Tensor:
    """Head-mean attention of the last position to every position ``[B, L]``, from the layer's own
    norm, q/k projections and rotary embedding (what its attention computes, one query row only)."""
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    batch, length, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[:, -1:]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    q = rotate(q, q, cos[:, -1:], sin[:, -1:])[0]
    k = rotate(k, k, cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return cls_attention(q, k, _additive(real[:, None, None, :], torch.float32), scale=attn.scaling)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean ``[B, Q, K]`` (or ``[B, 1, 1, K]``) allowed-mask as an additive float mask ``[B, 1, Q, K]``."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask if mask.dim() == 4 else mask[:, None]


def _scoring_macs(model: nn.Module, layer: int, num_tokens: Tensor) -> float:
    attn = model.model.language_model.layers[layer].self_attn
    per_row = attn.k_proj.in_features * (attn.k_proj.out_features * num_tokens.double() + attn.q_proj.out_features)
    return float(per_row.sum())
