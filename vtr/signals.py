"""Signals adapters compute for reducers, without forcing eager attention."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def cls_attention(q: Tensor, k: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Attention the first token (CLS) pays to every token, averaged over heads: ``[B, N]``.

    Only the CLS row is computed, ``softmax(q_cls . K^T * scale + bias)``: O(N d) instead of the
    O(N^2 d) full matrix, and identical to row 0 of it, so the block keeps its fused kernel.
    ``q``, ``k``: ``[B, H, N, D]`` after any q/k norm; ``bias``: additive key bias ``[B, 1, 1, N]``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-1, -2)  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)[:, :, 0].mean(dim=1)


class QKCapture:
    """Forward hooks on an attention's ``q_norm``/``k_norm`` that keep its q and k ``[B, H, N, D]``.

    Costs nothing extra: the attention computes q and k anyway; we only keep references until
    the reducer of the same block has read them.
    """

    def __init__(self) -> None:
        self.q: Optional[Tensor] = None
        self.k: Optional[Tensor] = None

    def attach(self, q_module, k_module) -> list:
        return [q_module.register_forward_hook(self._keep_q), k_module.register_forward_hook(self._keep_k)]

    def _keep_q(self, module, args, output) -> None:
        self.q = output

    def _keep_k(self, module, args, output) -> None:
        self.k = output

    def clear(self) -> None:
        self.q = self.k = None
