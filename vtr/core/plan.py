"""The settings a patched model holds: which method, with which schedule, fed how.

Settings only. Nothing a forward pass produces is kept here (see :mod:`vtr.core.run`), so a
patched model can be shared by threads, deep-copied, pickled and moved like any other model.
A learned reducer's parameters are weights, not settings: the same reducer object is also a submodule
of the patched model (``_vtr_reducer``, see ``vtr.api.attach_reducer``), so they train, save and move
with the model while this object keeps naming them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from .signals import Need

if TYPE_CHECKING:   # types only: the reducer and schedule layers sit above core
    from ..budget.schedule import Schedule
    from ..budget.visual import VisualPlan
    from ..reducers.base import Reducer

METRICS = ("x", "keys")
ACTIVE = ("always", "train")   # when a patched model reduces: every call, or in training mode only


@dataclass(frozen=True, eq=False)   # eq=False: hashed by identity, the key of per-thread reports
class Reduction:
    """A method bound to a model: reducer, per-layer schedule and how the model feeds it."""

    method: str
    reducer: "Reducer"
    schedule: "Schedule"
    metric: str = "x"               # "x" (hidden states) or "keys" (attention keys, head mean)
    prop_attn: bool = True          # proportional attention: log(size) added to attention logits
    arguments: dict = field(default_factory=dict)   # what the user passed, for describe()
    has_cls: bool = True            # first token is a CLS token (cls_attention exists)
    active: str = "always"          # "train": reduce in training mode only (eval runs the unreduced model)
    # Vision-language models: the visual-token budget, in-LLM layers and video split (typed; None elsewhere).
    visual: Optional["VisualPlan"] = None

    @property
    def reduces(self) -> bool:
        return any(a != (0 if self.schedule.kind == "r" else 1.0) for a in self.schedule.amounts)

    def reduces_in(self, training: bool) -> bool:
        """Whether a call in this mode reduces (``active="train"``: training mode only)."""
        return self.active == "always" or training

    @property
    def wants_cls_attention(self) -> bool:
        """The reducer reads the CLS attention row and the model has a CLS token."""
        return Need.CLS_ATTENTION in self.reducer.needs and self.has_cls

    @property
    def needs_qk(self) -> bool:
        """A reducing layer must see the attention's q and k (keys metric, CLS attention)."""
        return self.metric == "keys" or self.wants_cls_attention

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return f"{self.method!r}" + (f" ({args})" if args else "")
