"""The attention each visual token receives in Qwen-VL's vision tower: the importance a tower without a CLS token
offers to methods defined on the tower's attention (VisionZip, VisPruner, FasterVLM: ``Need.ATTENTION_RECEIVED``).

VisPruner's rule for towers without a [CLS] token (its SigLIP encoder): the last layer's attention, averaged over
the queries and the heads, per key. Here the last block of the tower (a full-attention block in Qwen2.5-VL's
configurations); a forward hook on its attention recomputes the attention rows from the block's own q and k (the
output of its ``qkv`` projection, kept by a hook on it, so nothing is projected twice; rotary applied, each image or
frame group its own chunk, as the block attends) in slices of queries, so the tower keeps its fused kernel and no
N x N matrix is held at once. Its cost, the ``q . k`` products of every chunk, is in the report's ``reducer_macs``
and in ``vtr.expected_flops`` (:func:`expected_macs`). A language-model token is the patch merger's
2 x 2 patches: it receives what they receive together, in the raster order of the tower's output (Qwen2.5-VL
runs its blocks in window order; the window index maps back).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.signals import Need

from ..base import remove_hooks

KEY = ("received",)   # where the run keeps the received attention of each tower call (images, then videos)
QUERY_SLICE = 1024    # query rows per slice of the attention rows


QKV = ("received", "qkv")   # where the run holds the last block's qkv output until its attention's hook reads it


class KeepQKV:
    """Forward hook on the last vision block's ``qkv`` projection: hands its output to the active run."""

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        run = runs._ACTIVE.get()
        if run is not None:
            run.captured[QKV] = output


class KeepReceived:
    """Forward hook (with kwargs) on the last vision block's attention: the attention each patch receives, mean
    over the queries of its chunk and the heads, appended to the active run. A plain class, so models pickle."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        run = runs._ACTIVE.get()
        if run is None:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        qkv = run.captured.pop(QKV, None)
        with torch.no_grad():
            received = received_per_patch(module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"], qkv)
        lengths = kwargs["cu_seqlens"].diff().double()
        macs = float((lengths * lengths).sum()) * module.qkv.in_features          # the q . k of every chunk
        run.captured.setdefault(KEY, []).append((received, macs))


def received_per_patch(attention: nn.Module, hidden: Tensor, cu_seqlens: Tensor, position_embeddings,
                       qkv: Optional[Tensor] = None) -> Tensor:
    """``[seq]`` float32: for each patch (in the block's order), the attention it receives, averaged over the heads
    and over the queries of its chunk (``cu_seqlens``). ``qkv``: the block's own ``qkv(hidden)`` where kept."""
    seq = hidden.shape[0]
    qkv = attention.qkv(hidden) if qkv is None else qkv
    q, k, _ = qkv.reshape(seq, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)           # [H, seq, d]
    scale = getattr(attention, "scaling", q.shape[-1] ** -0.5)
    received = q.new_zeros(seq)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = k[:, start:end]
        for first in range(start, end, QUERY_SLICE):
            rows = ((q[:, first:min(first + QUERY_SLICE, end)] * scale) @ keys.transpose(1, 2)).softmax(dim=-1)
            received[start:end] += rows.sum(dim=(0, 1))
        received[start:end] /= attention.num_heads * (end - start)
    return received


def install(model: nn.Module, reduction: Reduction) -> None:
    """Patch time: the hook, where the reducer reads the attention each token receives."""
    if Need.ATTENTION_RECEIVED in reduction.reducer.needs:
        attention = model.model.visual.blocks[-1].attn
        attention.qkv.register_forward_hook(KeepQKV())
        attention.register_forward_hook(KeepReceived(), with_kwargs=True)


def uninstall(model: nn.Module) -> None:
    remove_hooks(model, KeepQKV)
    remove_hooks(model, KeepReceived)


def expected_macs(model: nn.Module, reduction: Reduction, tokens: int) -> float:
    """The received pass's MACs for one image of ``tokens`` merged tokens (one chunk: the last block attends over
    the whole image), where the reducer reads it before the language model."""
    if reduction.visual.in_llm or Need.ATTENTION_RECEIVED not in reduction.reducer.needs:
        return 0.0
    visual = model.model.visual
    patches = tokens * visual.spatial_merge_size ** 2
    return float(patches * patches * visual.blocks[-1].attn.qkv.in_features)


def take(model: nn.Module, run, grid_thw: Tensor) -> tuple[Optional[list[Tensor]], float]:
    """Per image (or video) of one tower call, ``[tokens]`` the attention each language-model token receives (its
    merged patches' sum), in the tower's output order, and the multiply-accumulates it cost (the q . k products of
    the block's chunks); (None, 0) without the hook. Call once per tower call, in order."""
    kept = run.captured.get(KEY)
    if not kept:
        return None, 0.0
    per_patch, macs = kept.pop(0)
    visual = model.model.visual
    unit = visual.spatial_merge_size ** 2
    per_token = per_patch.view(-1, unit).sum(dim=1)                    # the block's (window) order
    window = window_index(visual, grid_thw)
    if window is not None:
        per_token = per_token[torch.argsort(window.to(per_token.device))]
    counts = (grid_thw.prod(dim=-1) // unit).tolist()
    return list(per_token.split(counts)), macs


def window_index(visual: nn.Module, grid_thw: Tensor) -> Optional[Tensor]:
    """Qwen2.5-VL's window order of the merged tokens (the tower's own function), None for Qwen2-VL (raster)."""
    if not hasattr(visual, "fullatt_block_indexes"):
        return None
    from transformers.vision_utils import get_vision_window_index
    index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size)
    return index
