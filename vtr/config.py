"""What a patched model carries: the reduction it applies and a report of its last forward pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from .reducers import Reducer
from .schedule import Schedule
from .state import TokenState


@dataclass
class Report:
    """What really happened in the last forward pass (detached; first dimension is the batch).

    tokens: tokens entering each block, then the count after the last block.
    assignment: ``[B, N0]`` index of the final token that carries each original token (-1 dropped).
    size: ``[B, N]`` how many original tokens each final token stands for.
    """

    tokens: list[int]
    assignment: Tensor
    size: Tensor
    num_protected: int
    grid: Optional[tuple[int, int]] = None  # patch grid (rows, cols) when the model has one


@dataclass
class Reduction:
    """A method bound to a model: reducer, per-layer schedule and how the model feeds it."""

    method: str
    reducer: Reducer
    schedule: Schedule
    metric: str = "x"               # "x" (hidden states) or "keys" (attention keys, head mean)
    prop_attn: bool = True          # proportional attention: log(size) added to attention logits
    arguments: dict = field(default_factory=dict)
    report: Optional[Report] = None
    final_state: Optional[TokenState] = None  # read by the pooling head of the same forward pass
    hooks: list = field(default_factory=list)      # handles to remove on unpatch
    captures: Optional[list] = None                 # per-block q/k captures (vtr.signals.QKCapture)
    query: Optional[Tensor] = None                  # set by vtr.conditioned(model, query)
    has_cls: bool = True                            # first token is a CLS token (cls_attention exists)
    original_class: Any = None

    @property
    def reduces(self) -> bool:
        return any(a != (0 if self.schedule.kind == "r" else 1.0) for a in self.schedule.amounts)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return f"{self.method!r}" + (f" ({args})" if args else "")
