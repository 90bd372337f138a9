"""The vision tower's attention at the layer a vision-language model reads its features from, for the methods defined
on it (VisionZip, VisPruner, FasterVLM; EViT, FastV and HiRED before the language model): the attention each patch
*receives* in a tower without a [CLS] token (``Need.ATTENTION_RECEIVED``: the SigLIP towers of LLaVA-OneVision,
Gemma 3 and SmolVLM / Idefics3), or the [CLS] row where the tower has that token (``Need.CLS_ATTENTION``: InternViT).

The received score is VisPruner's rule for SigLIP towers (its ``siglip_encoder.py``: the layer's attention weights
averaged over the query rows, then over the heads, per key): ``mean_h mean_i softmax(q_i k^T / sqrt(d))_j`` over the
patches ``i`` of the same image (padded patches neither attend nor are attended, as in the tower). Nothing asks the
tower for its attention weights (no eager fallback; SDPA stays on): hooks keep the q and k the layer computes anyway
(outputs of its ``q_norm`` / ``k_norm`` where it has them, else of ``q_proj`` / ``k_proj``), and a hook on the
attention module recomputes the rows from them in slices of queries, so no ``images x heads x N x N`` tensor is held
at once. Its cost (the ``q . k`` products: ``N^2 x width`` per image, ``N x width`` for a [CLS] row) is what the
report's ``reducer_macs`` and ``vtr.expected_flops`` add (:func:`pass_macs`).

Each family maps the per-patch scores through its own token transform (its own functions, so the map cannot drift
from the features'): a pooled or pixel-shuffled token receives what its patches receive together (the *sum*, as
Qwen-VL's 2 x 2 merger does, so an image's scores still add up as the patches' did), and a resampled token
(LLaVA-OneVision's bilinear interpolation) the blend of its neighbours' scores that its feature is of theirs.

The hooks are plain classes, so patched models pickle; a tower call outside a patched model's run records nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.signals import Need

from ..base import remove_hooks

KEY = ("tower_attention",)     # where a run keeps the scores of each tower call, in call order
QUERY_ELEMENTS = 1 << 24       # attention logits held at once (images x heads x query rows x keys)


def wanted(reduction: Reduction, cls: bool) -> bool:
    """The reducer reads what the tower can give before the language model: its [CLS] row (``cls``) or the
    attention each token receives."""
    return not reduction.visual.in_llm and (Need.CLS_ATTENTION if cls else Need.ATTENTION_RECEIVED) in \
        reduction.reducer.needs


def feature_layer_index(feature_layer: int, num_layers: int) -> Optional[int]:
    """The encoder layer whose output is ``hidden_states[feature_layer]`` (``hidden_states[0]`` being the
    embeddings), or None when that is the embeddings or ``feature_layer`` is not one int (several layers
    concatenated)."""
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        return None
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        return None
    index = feature_layer % (num_layers + 1) - 1
    return index if index >= 0 else None


def install(model: nn.Module, attention: nn.Module, cls: bool = False) -> None:
    """Hooks on ``attention`` (a Hugging Face vision attention: ``q_proj``, ``k_proj``, ``num_heads``, ``scale``,
    optionally ``q_norm`` / ``k_norm``): each call of it appends ``(scores [images, N], macs)`` to the run, the
    received attention or, with ``cls``, the [CLS] row (over every token, the [CLS] one first)."""
    q_source = getattr(attention, "q_norm", None) or attention.q_proj
    k_source = getattr(attention, "k_norm", None) or attention.k_proj
    q_source.register_forward_hook(KeepProjection("q"))
    k_source.register_forward_hook(KeepProjection("k"))
    attention.register_forward_hook(KeepTowerAttention(cls), with_kwargs=True)


def uninstall(model: nn.Module) -> None:
    remove_hooks(model, KeepProjection)
    remove_hooks(model, KeepTowerAttention)


def take(run) -> tuple[Optional[Tensor], float]:
    """The next tower call's ``[images, N]`` scores and the MACs they cost; (None, 0) where none were kept (no hook,
    or a tower call the hooks did not see)."""
    kept = run.captured.get(KEY)
    return kept.pop(0) if kept else (None, 0.0)


class KeepProjection:
    """Forward hook on the feature layer's q or k (after any norm): hands the output to the active run, which holds
    it until the attention's own hook has read it."""

    def __init__(self, which: str):
        self.which = which

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        run = runs._ACTIVE.get()
        if run is not None:
            run.captured[(KEY, self.which)] = output


class KeepTowerAttention:
    """Forward hook (with kwargs) on the feature layer's attention: the scores from the q and k just kept."""

    def __init__(self, cls: bool):
        self.cls = cls

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        run = runs._ACTIVE.get()
        if run is None:
            return
        q, k = run.captured.pop((KEY, "q"), None), run.captured.pop((KEY, "k"), None)
        if q is None or k is None:
            return
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        with torch.no_grad():
            scores = (cls_row(q, k, module.num_heads, module.scale, mask) if self.cls
                      else received(q, k, module.num_heads, module.scale, mask))
        run.captured.setdefault(KEY, []).append((scores, pass_macs(q.shape[0], q.shape[1], q.shape[2], self.cls)))


def pass_macs(images: int, tokens: int, width: int, cls: bool = False) -> float:
    """Multiply-accumulates of the scores of ``images`` images of ``tokens`` tokens, q and k ``width`` wide (all
    heads): every query's ``q . k`` row, or the [CLS] query's alone."""
    return float(images * (1 if cls else tokens) * tokens * width)


def key_validity(mask: Optional[Tensor], images: int, tokens: int) -> Optional[Tensor]:
    """``[images, tokens]`` True for the keys the layer's mask lets be attended (None: all), from a boolean
    (True: attend) or additive mask ``[images, 1, queries or 1, tokens]``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2
    return allowed.reshape(images, -1, tokens).any(dim=1)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """``[images, N, H * d]`` as float32 ``[images, H, N, d]``."""
    return x.float().view(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def received(q: Tensor, k: Tensor, num_heads: int, scale: float, mask: Optional[Tensor] = None) -> Tensor:
    """``[images, N]`` float32: the attention each token receives, ``mean_h mean_i softmax(q_i k^T * scale)``, over
    the heads and the valid query rows ``i`` of its image (``mask``: the layer's attention mask, padding excluded
    both as key and as query; the scores of padded tokens are 0). ``q``, ``k``: ``[images, N, H * d]``."""
    images, tokens = q.shape[:2]
    q, k = _heads(q, num_heads), _heads(k, num_heads)
    valid = key_validity(mask, images, tokens)
    bias = None if valid is None else torch.zeros(images, 1, 1, tokens, device=q.device).masked_fill(
        ~valid[:, None, None, :], float("-inf"))
    total = q.new_zeros(images, tokens)
    step = max(1, QUERY_ELEMENTS // (images * num_heads * tokens))
    for first in range(0, tokens, step):
        logits = (q[:, :, first:first + step] * scale) @ k.transpose(-1, -2)      # [images, H, rows, N]
        if bias is not None:
            logits = logits + bias
        rows = logits.softmax(dim=-1)
        if valid is not None:
            rows = rows * valid[:, None, first:first + step, None]
        total += rows.sum(dim=(1, 2))
    count = torch.full((images, 1), float(tokens), device=q.device) if valid is None else \
        valid.sum(dim=1, keepdim=True).float()
    return total / (num_heads * count.clamp_min(1))


def cls_row(q: Tensor, k: Tensor, num_heads: int, scale: float, mask: Optional[Tensor] = None) -> Tensor:
    """``[images, N]`` float32: the head-mean attention of the first token ([CLS]) to every token, from its row
    alone (:func:`vtr.core.signals.cls_attention`). ``q``, ``k``: ``[images, N, H * d]``."""
    from vtr.core.signals import cls_attention

    valid = key_validity(mask, q.shape[0], q.shape[1])
    bias = None if valid is None else torch.zeros(valid.shape[0], 1, 1, valid.shape[1], device=q.device).masked_fill(
        ~valid[:, None, None, :], float("-inf"))
    return cls_attention(_heads(q, num_heads), _heads(k, num_heads), bias=bias, scale=scale)


__all__ = ["KEY", "cls_row", "feature_layer_index", "install", "key_validity", "pass_macs", "received", "take",
           "uninstall", "wanted"]
