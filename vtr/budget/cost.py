"""Analytic multiply-accumulate (MAC) count of a ViT-style encoder that follows the token count.

Papers' "GFLOPs" for ViTs are GMACs (ViT-B/16 at 224 = 17.58); vtr reports MACs and says so.
The count is exact for the matrix products (linear layers, attention scores and values, the
reducers' similarity matrices); norms, activations and softmax are left out, as every counter does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class EncoderCost:
    """MACs per image of a stack of pre-norm transformer blocks, as a function of token counts.

    Per block ``i`` with ``n`` tokens in and ``m`` after the block's reduction step (which sits
    between attention and MLP): ``attn_linear * n + 2 * attn_dim * n**2 + mlp_linear * m``.
    """

    num_tokens: int          # tokens entering the first block
    num_protected: int
    num_layers: int
    attn_linear: float       # MACs per token of the attention's linear layers (qkv, proj)
    attn_dim: int            # width of q/k/v (heads x head_dim)
    mlp_linear: float        # MACs per token of the MLP
    fixed: float             # MACs outside the blocks that do not depend on the token count
    per_final_token: float = 0.0   # MACs per token after the last block (e.g. attention pooling)
    metric_dim: int = 0      # width of the similarity metric the reducer compares
    grid: Optional[tuple] = None   # patch grid (rows, cols) at the default input size, if known
    has_cls: bool = True           # the first token is a CLS token (CLS-attention signals exist)
    width: int = 0                 # channels of the tokens (learned reducers size their modules by it); 0: unknown

    def block(self, tokens_in: int, tokens_out: int) -> float:
        return (self.attn_linear * tokens_in + 2 * self.attn_dim * tokens_in**2
                + self.mlp_linear * tokens_out)

    def total(self, tokens: Sequence[int], *, filters_input: bool = False,
              decision_macs: Optional[Callable[[int, int], float]] = None) -> float:
        """MACs for ``tokens`` = counts entering each block plus the final count (L + 1 values).

        ``filters_input``: the step filters a block's input (ATF), so the whole block runs on the
        count after it. ``decision_macs(n, m)``: what deciding a step from ``n`` to ``m`` tokens costs (the
        schedule passes the reducer's own count; this model of the encoder knows no reducer).
        """
        if len(tokens) != self.num_layers + 1:
            raise ValueError(f"tokens must list {self.num_layers + 1} counts, got {len(tokens)}")
        macs = self.fixed + self.per_final_token * tokens[-1]
        for n_in, n_out in zip(tokens[:-1], tokens[1:]):
            macs += self.block(n_out, n_out) if filters_input else self.block(n_in, n_out)
            if decision_macs is not None and n_out < n_in:
                macs += decision_macs(n_in, n_out)
        return macs

    def unreduced(self) -> float:
        return self.total([self.num_tokens] * (self.num_layers + 1))
