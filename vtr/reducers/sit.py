"""Learned slimming (SiT, Zong et al., "Self-slimmed Vision Transformer").

At each reducing block a token slimming module maps the N unprotected tokens to M: an MLP gives every
input token M logits, a softmax over the N inputs turns each output's column into mixing weights, and
output j is the weighted mean of the inputs. Training and eval compute the same thing (no sampling),
so the module trains by plain backpropagation. M is a parameter shape: it is fixed when the model is
patched, at the model's default input size.

Sizes and provenance of a soft merge:

- **size:** each input token hands its size to the outputs in proportion to the weight each output
  takes from it (``w[i, j] / sum_j w[i, j]``), so total size is conserved and proportional attention
  still weighs an output by how much of the image it stands for;
- **assignment:** a soft merge has no single destination, so an original token's ``assignment``
  names the output that takes the largest share of the token that carried it (its dominant output).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.state import TokenState
from .base import Reducer, Signals, check_number, register
from .drop import after_mixing
from .learned import before_last_block, check_width, learnable_stages, stage_module
from .select import real_tokens


class Slimming(nn.Module):
    """SiT's token slimming module: ``[B, N, C]`` tokens -> ``[B, N, M]`` weights, a softmax over the N inputs."""

    def __init__(self, width: int, outputs: int):
        super().__init__()
        self.outputs = outputs
        hidden = max(width // 2, 1)
        # No bias on the last layer: a softmax over the inputs ignores a constant per output.
        self.score = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                                   nn.Linear(hidden, outputs, bias=False))

    @staticmethod
    def macs(width: int, num_inputs: int, outputs: int) -> float:
        """MACs of the MLP on every input plus the weighted means of the outputs."""
        hidden = max(width // 2, 1)
        return float(num_inputs * (width * hidden + hidden * outputs) + outputs * num_inputs * width)

    def forward(self, x: Tensor, valid: Tensor, temperature: float) -> Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        logits = self.score(x).to(compute) / temperature
        logits = logits.masked_fill(~valid[..., None], torch.finfo(compute).min)   # padding takes no weight
        return logits.softmax(dim=1) * valid[..., None]


@register
class SiT(Reducer):
    """Learned soft slimming; see the module docstring. ``temperature`` divides the logits before the
    softmax (lower: each output draws on fewer inputs). By default it slims at a quarter, half and three
    quarters of the depth, as ``dynamicvit`` and ``evit``, never at the last block."""

    name = "sit"
    description = "learned slimming: every output token is a learned soft mix of all input tokens (SiT; trainable)"
    paper = "Zong et al. 2021, arXiv 2111.12624"
    stages = ("tower",)
    max_step = 1.0
    learned = True

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        temperature = check_number(self, "temperature", temperature, "a finite number > 0", lambda t: t > 0)
        self.temperature = float(temperature)
        self.slimmers = nn.ModuleDict()

    def build(self, width: int, counts: Sequence[int], num_protected: int) -> None:
        width = check_width(self, width)
        self.slimmers = nn.ModuleDict({str(layer): Slimming(width, kept - num_protected)
                                       for layer, _, kept in learnable_stages(self, counts)})

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        unprotected = num_tokens - cost.num_protected
        outputs = (unprotected + 1) // 2 if num_kept is None else num_kept - cost.num_protected
        return Slimming.macs(cost.width, unprotected, outputs)

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        return before_last_block(after_mixing(num_layers), num_layers)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        slimming = stage_module(self, self.slimmers, signals.layer)
        protected, outputs = state.num_protected, num_kept - state.num_protected
        if outputs != slimming.outputs:
            raise ValueError(f"sit: block {signals.layer} learned to slim to {slimming.outputs} tokens, but this call "
                             f"keeps {outputs} of {state.num_tokens - protected} (an input of another size than the "
                             "model was patched for); patch the model at the input size it runs at")
        if state.mask is not None:
            raise ValueError("sit: a masked token state (training-time masking) cannot be slimmed")
        x, size = state.x[:, protected:], state.size[:, protected:]
        valid = real_tokens(state)
        weight = slimming(x, valid, self.temperature)                           # [B, U, M]
        mixed = weight.transpose(1, 2).to(x.dtype) @ x                          # [B, M, C]
        share = weight / weight.sum(dim=2, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        slimmed = (share * size[..., None].to(share.dtype)).sum(dim=1).float()   # each input's size, shared out
        batch = state.x.shape[0]
        dominant = torch.where(valid, protected + weight.argmax(dim=2), -1)
        dest = torch.cat([torch.arange(protected, device=state.x.device).expand(batch, protected), dominant], 1)
        assignment = dest.gather(1, state.assignment.clamp_min(0))
        return TokenState(
            x=torch.cat([state.x[:, :protected], mixed], dim=1),
            size=torch.cat([state.size[:, :protected], slimmed], dim=1),
            assignment=torch.where(state.assignment >= 0, assignment, -1),
            num_protected=protected,
            padded=state.padded,
        )
