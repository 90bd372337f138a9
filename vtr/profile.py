"""Count what a model really computes, with torch's FlopCounterMode made complete for ViTs.

torch 2.14 counts fused attention on CUDA but not the CPU kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), so a CPU count of any timm ViT misses all
attention matmuls. We register the same formula torch uses for the CUDA kernels. Counts are
reported as MACs (multiply-accumulates; torch's FLOPs / 2), the unit of papers' "GFLOPs".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import flop_counter


def _register_cpu_sdpa() -> None:
    ops = torch.ops.aten
    forward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is None or forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    backward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if backward is not None and backward not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(backward)
        def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_register_cpu_sdpa()


@dataclass
class MacCount:
    """MACs of one forward pass, for the whole batch and per image."""

    total: float
    batch: int
    by_module: dict

    @property
    def per_image(self) -> float:
        return self.total / self.batch


def count_macs(model: nn.Module, *inputs: torch.Tensor, **kwargs) -> MacCount:
    """Run ``model(*inputs)`` once under FlopCounterMode and return its MACs.

    Runs with gradients off by freezing the parameters rather than under ``torch.no_grad``: the
    counter's module tracker fails on timm's attention pooling under no_grad (torch 2.14).
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with flop_counter.FlopCounterMode(display=False) as counter:
            model(*inputs, **kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    by_module = {name: sum(ops.values()) / 2 for name, ops in counter.get_flop_counts().items()}
    batch = inputs[0].shape[0] if inputs else 1
    return MacCount(total=counter.get_total_flops() / 2, batch=batch, by_module=by_module)
