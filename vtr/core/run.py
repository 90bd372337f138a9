"""Per-call state of a patched model: opened when a forward pass starts, dropped when it ends.

A patched model keeps only its settings (:class:`~vtr.core.plan.Reduction`). Everything a forward
pass produces (the token state between blocks, the q/k a reducer reads, the query set by
``vtr.conditioned``) lives in a :class:`Run` that the pass opens, hands down through a context
variable and closes. What outlives the call is a detached :class:`Report`, kept per thread (and per
asyncio task) in another context variable, with a weak reference to the tokens the call returned (a
head called on its own pools them by their sizes). So concurrent callers never see each other's
tokens, and no autograd graph stays on the model after the call.

Two more per-thread switches live here, beside ``vtr.conditioned``'s query: a model switched off
(``vtr.disabled``, and eval-mode calls of a model patched with ``active="train"``) runs as the unpatched
model, and ``vtr.decisions`` collects a pass's training-time keep decisions, with their gradient, for
a loss. Both are context variables, never attributes of the model.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

from torch import Tensor

from .plan import Reduction
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
    mask: Optional[Tensor] = None           # [B, N] final keep decisions under training-time masking


@dataclass(frozen=True)
class Decision:
    """One training-time keep decision of a pass (DynamicViT), for the keep-ratio loss.

    keep: ``[B, U]`` cumulative keep decisions over the unprotected tokens (0 or 1, with a
        straight-through gradient to the predictor). target: the fraction of the original unprotected
        tokens the schedule keeps after this step (what eval mode keeps exactly).
    """

    layer: int
    keep: Tensor
    target: float


@dataclass(frozen=True)
class LastCall:
    """What this thread keeps of its last call of a patched model.

    report: the call's :class:`Report`, or None when it ran unreduced (``vtr.disabled``, or eval mode under
        ``active="train"``): ``vtr.report`` then says so rather than describe an earlier call as this one.
    features: a weak reference to the tokens the call returned to its caller (timm ``forward_features``),
        so a head called on its own knows they are this call's tokens and pools them by this call's sizes.
        Weak: it keeps no tensor, and no graph, alive.
    """

    report: Optional[Report]
    features: Optional[weakref.ref] = None

    def returned(self, x: Tensor) -> bool:
        """``x`` is the tokens this call returned, or all of them under another name (``features.detach()``,
        ``.data``: the same memory in the same layout). While they are alive no other tensor has their memory."""
        features = None if self.features is None else self.features()
        if features is None:
            return False
        return x is features or (x.device == features.device and x.device.type != "meta" and x.numel() > 0
                                 and x.data_ptr() == features.data_ptr() and x.shape == features.shape
                                 and x.stride() == features.stride())


@dataclass(eq=False)
class Run:
    """One forward pass of a patched model: the token state as it flows and what the blocks hand on."""

    reduction: Reduction
    query: Optional[Tensor] = None                 # from vtr.conditioned, for this call
    query_projection: Optional[Callable[[Tensor], Tensor]] = None   # tokens into the query's space
    state: Optional[TokenState] = None             # the tokens between blocks
    tokens: list[int] = field(default_factory=list)
    grid: Optional[tuple] = None
    num_layers: int = 0
    captured: dict = field(default_factory=dict)   # (layer, "q" | "k") -> tensor, kept by KeepQK hooks
    decisions: Optional[list] = None               # where vtr.decisions collects this call's Decisions

    def begin(self, state: TokenState, num_layers: int, grid: Optional[tuple] = None) -> TokenState:
        self.state, self.num_layers, self.grid = state, num_layers, grid
        self.tokens = [state.num_tokens]
        return state

    def advance(self, state: TokenState) -> None:
        """The state after one block."""
        self.state = state
        self.tokens.append(state.num_tokens)

    def take_qk(self, layer: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The q and k ``[B, H, N, D]`` the attention of ``layer`` computed in this pass (then forgotten)."""
        return self.captured.pop((layer, "q"), None), self.captured.pop((layer, "k"), None)

    def finish(self, report: Optional[Report] = None) -> Report:
        """Record the detached report of this pass for ``vtr.report`` in the caller's thread."""
        if report is None:
            state = self.state
            report = Report(tokens=list(self.tokens), assignment=state.assignment.detach(),
                            size=state.size.detach(), num_protected=state.num_protected, grid=self.grid,
                            mask=None if state.mask is None else state.mask.detach())
        self.captured.clear()
        record(self.reduction, report)
        return report


_ACTIVE: ContextVar[Optional[Run]] = ContextVar("vtr_active_run", default=None)
_LAST: ContextVar[Optional[weakref.WeakKeyDictionary]] = ContextVar("vtr_last_calls", default=None)
_QUERIES: ContextVar[Optional[dict]] = ContextVar("vtr_queries", default=None)
_OFF: ContextVar[frozenset] = ContextVar("vtr_off", default=frozenset())
_DECISIONS: ContextVar[Optional[dict]] = ContextVar("vtr_decisions", default=None)


def active(reduction: Optional[Reduction] = None) -> Optional[Run]:
    """The run of the innermost patched forward pass in progress here (of ``reduction``'s model if given)."""
    run = _ACTIVE.get()
    if run is None or (reduction is not None and run.reduction is not reduction):
        return None
    return run


@contextmanager
def opened(reduction: Reduction, training: bool = True) -> Iterator[Optional[Run]]:
    """The run of this forward pass: the one already open for this model, or a new one for the call.

    None when the call must not reduce (``vtr.disabled``, or an eval-mode call of a model patched with
    ``active="train"``): the caller then runs the unpatched model's own code, and everything the call
    reaches (blocks, pooling) sees the model switched off.
    """
    run = active(reduction)
    if run is not None:
        yield run
        return
    if skips(reduction, training):
        with unreduced(reduction):
            yield None
        return
    run = Run(reduction, query=query_of(reduction), decisions=(_DECISIONS.get() or {}).get(reduction))
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)


def skips(reduction: Reduction, training: bool) -> bool:
    """A call of the model in this mode runs unreduced (switched off here, or eval under ``active="train"``)."""
    return reduction in _OFF.get() or not reduction.reduces_in(training)


@contextmanager
def switched_off(reduction: Reduction) -> Iterator[None]:
    """Calls of this model inside the block run as the unpatched model, in this thread only.

    No run is active inside (not even another model's), so every patched block falls back to its
    original forward.
    """
    token = _OFF.set(_OFF.get() | {reduction})
    active_token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(active_token)
        _OFF.reset(token)


@contextmanager
def unreduced(reduction: Reduction) -> Iterator[None]:
    """A call of the model that must not reduce: switched off (:func:`switched_off`) while it runs, and once it
    has returned, this thread's last call of the model is an unreduced one (``vtr.report`` says so)."""
    with switched_off(reduction):
        yield
    _keep(reduction, LastCall(None))


@contextmanager
def collecting(reduction: Reduction) -> Iterator[list]:
    """Collect the :class:`Decision` of every training-time step of this model's calls inside the block."""
    found: list = []
    table = dict(_DECISIONS.get() or {})
    table[reduction] = found
    token = _DECISIONS.set(table)
    try:
        yield found
    finally:
        _DECISIONS.reset(token)


@contextmanager
def bound(run: Run) -> Iterator[Run]:
    """Make ``run`` the active one again (activation checkpointing recomputes a block after the call)."""
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)


def record(reduction: Reduction, report: Report) -> None:
    """Keep ``report`` as this thread's last call of the model patched with ``reduction``."""
    _keep(reduction, LastCall(report))


def returned(reduction: Reduction, features: Tensor) -> Tensor:
    """Note ``features`` as the tokens this thread's last call of the model returned (see :class:`LastCall`)."""
    last = last_call(reduction)
    if last is not None:
        _keep(reduction, replace(last, features=weakref.ref(features)))
    return features


def last_call(reduction: Reduction) -> Optional[LastCall]:
    calls = _LAST.get()
    return None if calls is None else calls.get(reduction)


def _keep(reduction: Reduction, last: LastCall) -> None:
    calls = _LAST.get()
    calls = weakref.WeakKeyDictionary() if calls is None else calls.copy()   # copy: contexts stay apart
    calls[reduction] = last
    _LAST.set(calls)


@contextmanager
def conditioned_on(reduction: Reduction, query: Tensor) -> Iterator[None]:
    """``query`` for the forward passes of this model inside the block, in this thread only."""
    queries = dict(_QUERIES.get() or {})
    queries[reduction] = query
    token = _QUERIES.set(queries)
    try:
        yield
    finally:
        _QUERIES.reset(token)


def query_of(reduction: Reduction) -> Optional[Tensor]:
    """The query of ``vtr.conditioned`` for a call of this model, checked once per call.

    A NaN or Inf in it would make every relevance score NaN, and greedy or top-k selection on NaN
    picks arbitrary, even repeated, tokens while the report still counts them as kept: one
    ``isfinite`` over the query, before anything runs, turns that into an error.
    """
    query = (_QUERIES.get() or {}).get(reduction)
    if query is not None and not bool(query.isfinite().all()):
        bad = int((~query.isfinite()).sum())
        raise ValueError(f"query must be finite (the query of vtr.conditioned(model, query)), got {bad} NaN or Inf "
                         f"of {query.numel()} values in a query of shape {tuple(query.shape)}")
    return query


class KeepQK:
    """Forward hook on an attention's q or k norm that hands its output to the active run.

    Costs nothing extra: the attention computes q and k anyway; the run keeps a reference until the
    reducer of the same block has read it. A plain class (not a closure), so patched models pickle.
    """

    def __init__(self, layer: int, which: str):
        self.layer, self.which = layer, which

    def __call__(self, module, args, output) -> None:
        run = _ACTIVE.get()
        if run is not None:
            run.captured[(self.layer, self.which)] = output


def final_sizes(reduction: Reduction, x: Tensor, training: bool) -> Optional[Tensor]:
    """Sizes ``[B, N]`` of the final tokens ``x`` when pooling must weigh by them, or None when the
    model's own pooling is exact (nothing reduced, no padding).

    From the run in progress, or, when the head is called on its own after the features
    (``forward_features`` then ``forward_head``), from the call that returned ``x``: this thread's last
    call of the model. The tokens of any other call (an earlier one, another thread's) have sizes the
    model no longer knows, and their shape cannot tell them apart, so they are refused; unless the model
    runs unreduced here (``vtr.disabled``, eval mode under ``active="train"``, ``training`` being the
    model's mode), where the head is the unpatched model's.
    """
    run = active(reduction)
    if run is not None and run.state is not None:
        size, num_original = run.state.weight(), run.state.num_original
        padded, masked = run.state.padded, run.state.mask is not None
    else:
        last = last_call(reduction)
        if last is None or not last.returned(x):
            if skips(reduction, training):
                return None
            if last is None:
                raise RuntimeError("a vtr-patched model pools the tokens of its own forward pass; run the model "
                                   "(or its forward_features) first")
            raise RuntimeError(
                "a vtr-patched model pools reduced tokens by the sizes of the call that produced them, and these "
                "are not the tokens this thread's last call of the model returned (an earlier call's, or another "
                "thread's): call the model as a whole (model(x)), or pass the head the features that "
                "forward_features just returned")
        report = last.report
        if report is None:   # an unreduced call returned them: the model's own pooling is exact
            return None
        size, num_original = report.size, report.assignment.shape[1]
        padded, masked = bool((size == 0).any()), report.mask is not None
        if masked:
            size = size * report.mask
    if tuple(size.shape) != tuple(x.shape[:2]):
        raise RuntimeError(f"a vtr-patched model pools the tokens of its own last forward pass: it ended with "
                           f"{tuple(size.shape)} tokens, the head got {tuple(x.shape[:2])}")
    if size.shape[1] == num_original and not padded and not masked:
        return None
    return size
