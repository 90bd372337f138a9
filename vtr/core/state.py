"""The token state: the one object that flows through every reducer.

A reducer never edits tokens in place. It decides, for each current token, where that token goes
in the smaller sequence (its *destination*, or -1 to drop it), and :meth:`TokenState.reduce`
applies that decision to the features, the sizes and the provenance at once. The decision is made
once; applying it is one size-weighted scatter.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import kernels

MASK_FLOOR = 1e-6   # attention weight left to a masked token (see TokenState.attention_bias)


@dataclass
class TokenState:
    """Tokens of a batch plus what each one stands for.

    Attributes:
        x: ``[B, N, C]`` token features.
        size: ``[B, N]`` float32, how many original tokens each token stands for. Padding tokens
            have size 0, so they weigh nothing in merges and get ``-inf`` attention bias.
        assignment: ``[B, N0]`` int64 provenance. For each original token, the index of the
            current token that carries it, or -1 if it was dropped. Composes step to step in
            O(N0) memory.
        num_protected: leading tokens (CLS, distillation, registers) that are never merged away or
            dropped and keep their positions.
        padded: the sequence may hold padding. Set once at the start so no step has to ask the
            device (a host sync per block on CUDA); padding only ever leaves.
        mask: ``[B, N]`` keep decisions of training-time masking (DynamicViT), or None. Under masking
            the batch keeps its shape and every row its own choice: a token with mask 0 stays in the
            sequence, but the others attend to it (and pooling weighs it) as if it were gone. Values
            are 0 or 1 with a straight-through gradient to the decision that set them.
        scheduled_tokens: under masking, the token count the decisions aim at (what the unmasked,
            eval-mode model has here); the schedule reads it instead of the sequence length.
    """

    x: Tensor
    size: Tensor
    assignment: Tensor
    num_protected: int
    padded: bool = False
    mask: Optional[Tensor] = None
    scheduled_tokens: Optional[int] = None

    @classmethod
    def start(cls, x: Tensor, num_protected: int = 0, padding_mask: Optional[Tensor] = None) -> "TokenState":
        """State of an unreduced sequence. ``padding_mask`` is ``[B, N]``, True for real tokens."""
        if x.dim() != 3:
            raise ValueError(f"x must be [batch, tokens, channels], got a tensor of shape {tuple(x.shape)}")
        batch, num_tokens, _ = x.shape
        if not 0 <= num_protected < num_tokens:
            raise ValueError(
                f"num_protected must be in [0, {num_tokens - 1}] for {num_tokens} tokens, got {num_protected}"
            )
        if padding_mask is None:
            size = torch.ones(batch, num_tokens, dtype=torch.float32, device=x.device)
        else:
            if padding_mask.shape != (batch, num_tokens):
                raise ValueError(
                    f"padding_mask must be [batch, tokens] = {(batch, num_tokens)}, got {tuple(padding_mask.shape)}"
                )
            size = padding_mask.to(device=x.device, dtype=torch.float32)
        assignment = torch.arange(num_tokens, device=x.device).expand(batch, num_tokens)
        padded = padding_mask is not None and not bool(padding_mask.all())
        return cls(x=x, size=size, assignment=assignment, num_protected=num_protected, padded=padded)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    @property
    def num_original(self) -> int:
        return self.assignment.shape[1]

    @property
    def num_scheduled(self) -> int:
        """The token count the schedule sees: the sequence length, or under masking the count aimed at."""
        return self.num_tokens if self.scheduled_tokens is None else self.scheduled_tokens

    @property
    def is_reduced(self) -> bool:
        """True once any step has removed tokens (the point where sizes start to matter)."""
        return self.num_tokens < self.num_original

    def with_x(self, x: Tensor) -> "TokenState":
        return replace(self, x=x)

    def masked(self, mask: Tensor, scheduled_tokens: int) -> "TokenState":
        """The same tokens under new keep decisions ``mask`` ``[B, N]`` aiming at ``scheduled_tokens``."""
        if mask.shape != self.size.shape:
            raise ValueError(f"mask must be [batch, tokens] = {tuple(self.size.shape)}, got {tuple(mask.shape)}")
        return replace(self, mask=mask, scheduled_tokens=scheduled_tokens)

    def weight(self) -> Tensor:
        """``[B, N]`` what each token counts for in pooling: its size, times its keep decision under masking."""
        return self.size if self.mask is None else self.size * self.mask

    def attention_bias(self, proportional: bool) -> Optional[Tensor]:
        """Additive key bias ``[B, 1, 1, N]`` for scaled_dot_product_attention, or None.

        Proportional attention (ToMe) adds ``log(size)``: a token that stands for s tokens gets
        the attention s copies would get. Size-0 padding gets ``-inf`` either way. Before any
        reduction (and without padding) this returns None so the model runs its exact kernel.

        Under masking, ``log(MASK_FLOOR + (1 - MASK_FLOOR) * mask)`` is added: attention to a masked
        token is scaled by ``MASK_FLOOR`` (1e-6), never by exactly 0, so the gradient of what the
        model would gain by keeping it (DynamicViT's masked softmax) still reaches its decision.
        """
        if self.mask is None and not self.padded and not (proportional and self.is_reduced):
            return None
        if proportional:
            bias = self.size.log()
        else:
            bias = torch.zeros_like(self.size).masked_fill(self.size == 0, float("-inf"))
        if self.mask is not None:
            bias = bias + (MASK_FLOOR + (1 - MASK_FLOOR) * self.mask.float()).log()
        return bias.to(self.x.dtype)[:, None, None, :]

    def reduce(self, dest: Tensor, num_kept: int, weight: Optional[Tensor] = None) -> "TokenState":
        """Apply a reduction decision.

        Args:
            dest: ``[B, N]`` int64, index in ``[0, num_kept)`` of the token each current token
                goes to, or -1 to drop it. Tokens sharing a destination are merged.
            num_kept: number of tokens after the step.
            weight: ``[B, N]`` merge weights for the features; defaults to ``size``, which makes
                merging conserve the size-weighted sum of features exactly.

        Sizes always add up, so a pure merge conserves total size; dropped tokens take their
        size with them.
        """
        batch, num_tokens, channels = self.x.shape
        if self.mask is not None:
            raise ValueError("a masked token state (training-time masking) keeps its length: it cannot be reduced")
        if dest.shape != (batch, num_tokens):
            raise ValueError(f"dest must be [batch, tokens] = {(batch, num_tokens)}, got {tuple(dest.shape)}")
        by_size, weight = weight is None, self.size if weight is None else weight
        # Flatten the batch and send dropped tokens to one trash row past the end: a single
        # scatter-add over all tokens does every merge of every row (deterministic on CPU).
        rows = torch.arange(batch, device=dest.device)[:, None] * num_kept
        trash = batch * num_kept
        flat_dest = torch.where(dest >= 0, dest + rows, trash).flatten()

        merge = kernels.merge if kernels.use_for(self.x, weight) else _merge   # CuPy: one deterministic pass
        x, total_weight = merge(self.x.reshape(-1, channels), weight.flatten(), flat_dest, trash)
        if by_size:   # the weights are the sizes: their sums are the new sizes (whole numbers, exact)
            size = total_weight.to(self.size.dtype)
        else:
            size = self.size.new_zeros(trash + 1).index_add_(0, flat_dest, self.size.flatten())[:trash]

        assignment = dest.gather(1, self.assignment.clamp_min(0))
        assignment = torch.where(self.assignment >= 0, assignment, -1)
        return TokenState(
            x=x.view(batch, num_kept, channels).to(self.x.dtype),
            size=size.view(batch, num_kept),
            assignment=assignment,
            num_protected=self.num_protected,
            padded=self.padded,
        )

    # -- the algebra of states: what adapters compose instead of editing ``assignment`` by hand ---------------

    def restarted(self) -> "TokenState":
        """The same tokens (sizes kept) taken as the originals of what follows: a reduction of them composes
        back onto this state's provenance with :meth:`then` (in-LLM stages, a reduction in several steps)."""
        identity = torch.arange(self.num_tokens, device=self.x.device).expand_as(self.size)
        return replace(self, assignment=identity, mask=None, scheduled_tokens=None)

    def then(self, after: "TokenState") -> "TokenState":
        """``after``, a reduction of this state's current tokens taken as originals (:meth:`restarted`), with this
        state's provenance: each original token goes where the token that carried it went."""
        assignment = after.assignment.gather(1, self.assignment.clamp_min(0))
        return replace(after, assignment=torch.where(self.assignment >= 0, assignment, -1))

    def joined(self, parts: Sequence[tuple[Tensor, "TokenState"]]) -> "TokenState":
        """This state with its current tokens split into parts, each reduced on its own (crops of an image,
        frames of a video), the parts' tokens concatenated in order.

        ``parts``: ``(members, reduced)`` with ``members`` ``[n]`` indices of current tokens and ``reduced`` a
        state whose originals are those members in that order. Current tokens in no part are dropped; the
        parts hold no protected tokens.
        """
        batch, device = self.x.shape[0], self.x.device
        dest = torch.full((batch, self.num_tokens), -1, dtype=torch.long, device=device)
        offset = 0
        for members, reduced in parts:
            own = reduced.assignment
            dest[:, members.to(device)] = torch.where(own >= 0, own + offset, -1)
            offset += reduced.num_tokens
        assignment = torch.where(self.assignment >= 0, dest.gather(1, self.assignment.clamp_min(0)), -1)
        return TokenState(x=torch.cat([reduced.x for _, reduced in parts], dim=1),
                          size=torch.cat([reduced.size for _, reduced in parts], dim=1),
                          assignment=assignment, num_protected=0, padded=self.padded)

    @staticmethod
    def stacked(states: Sequence["TokenState"]) -> "TokenState":
        """States of the same shape (images reduced one by one) as one batch."""
        first = states[0]
        if len(states) == 1:
            return first
        return TokenState(x=torch.cat([s.x for s in states]), size=torch.cat([s.size for s in states]),
                          assignment=torch.cat([s.assignment for s in states]), num_protected=first.num_protected,
                          padded=any(s.padded for s in states))

    def first_carried(self, values: Optional[Tensor] = None, missing: Optional[int] = None) -> Tensor:
        """``[B, K]`` the first original token each current token carries: its index, or its entry of ``values``
        (``[B, N0]`` or ``[N0]``, non-decreasing along the originals, e.g. prompt columns). A token that
        carries none gets ``missing`` (default ``N0``)."""
        missing = self.num_original if missing is None else missing
        index = torch.arange(self.num_original, device=self.x.device) if values is None else values
        none = torch.iinfo(torch.long).max   # the identity of "amin": a token no original reaches keeps it
        first = torch.full(self.size.shape, none, dtype=torch.long, device=self.x.device)
        carried = torch.where(self.assignment >= 0, index.expand_as(self.assignment), none)
        first.scatter_reduce_(1, self.assignment.clamp_min(0), carried, "amin")
        return first.masked_fill(first == none, missing)


def _merge(x: Tensor, weight: Tensor, flat_dest: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
    """Weighted mean of the rows of ``x`` sent to each of ``num_out`` outputs (``flat_dest``;
    ``num_out`` = dropped) and the summed weight of each, in plain torch: the reference the CuPy
    kernel (``vtr.kernels.merge``) is tested against."""
    # Accumulate in at least float32: under autocast x may be bf16, sizes never are.
    compute = torch.promote_types(x.dtype, torch.float32)
    weight = weight.to(compute)
    total_weight = weight.new_zeros(num_out + 1).index_add_(0, flat_dest, weight)
    weighted = x.to(compute) * weight[:, None]
    # scatter_add_ with the index broadcast over channels: twice as fast as index_add_ on CPU.
    summed = weighted.new_zeros(num_out + 1, x.shape[1]).scatter_add_(0, flat_dest[:, None].expand_as(weighted),
                                                                      weighted)
    total_weight = total_weight[:num_out]
    return summed[:num_out] / total_weight[:, None].clamp_min(torch.finfo(compute).tiny), total_weight
