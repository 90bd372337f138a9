"""What every reducer shares: the base class, the registry and the destination-map helpers."""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.numbers import plain_scalar
from ..core.signals import Need, Signals, needs as _needs
from ..core.state import TokenState

# Where a method can act (``Reducer.stages``): inside a vision tower (timm / open_clip / Hugging Face ViTs),
# on a vision-language model's visual tokens before its language model, or inside the language model
# (``layers=`` on a VLM). Adapters refuse a method at a stage it does not list.
STAGES = ("tower", "before_lm", "in_lm")
STAGE_WORDS = {"tower": "in the vision tower", "before_lm": "before the language model",
               "in_lm": "inside the language model"}


class Reducer(nn.Module):
    """Takes a token state and a token budget, returns a smaller state.

    Subclasses set ``name``/``description``, the signals they need, and ``max_step``: the largest
    fraction of unprotected tokens one step may remove (0.5 for bipartite matching).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""              # short citation with its arXiv id ("" for a plain baseline)
    stages: ClassVar[tuple[str, ...]] = STAGES   # where it can act, a subset of STAGES (see vtr.methods)
    needs: ClassVar[frozenset[Need]] = frozenset()   # vtr.core.signals.Need; strings are checked and converted
    max_step: ClassVar[float] = 1.0
    # True for filters that act on a block's *input* (ATF filters the embedded tokens before block 0):
    # the adapter then runs layer i's step before block i's attention instead of between its
    # attention and MLP. Schedules still list the count before each step; block i runs on the count
    # after it. Such a step sees ``signals.metric`` = the hidden states and no cls_attention.
    acts_before_blocks: ClassVar[bool] = False
    # True for reducers with parameters (dynamicvit, sit): vtr.patch calls build() with the model's
    # sizes and registers the reducer on the model, so its weights train, save and move with it.
    learned: ClassVar[bool] = False
    # What a reducer is, for model families and tools to ask (never its class or name):
    identity: ClassVar[bool] = False       # keeps every token (the 'none' method): no budget, nothing to do
    fixed_count: ClassVar[bool] = False    # its options set how many tokens it keeps (pool's factor), not a budget
    # A dropping method's published rule for the tokens it does not keep ("drop", or EViT's "one"), where vtr's
    # default (merge each into its nearest kept token) is unmeasured: before or inside a language model.
    published_fuse: ClassVar[Optional[str]] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        try:
            cls.needs = _needs(*cls.needs)
        except ValueError as error:
            raise TypeError(f"{cls.__name__}.needs: {error}") from None
        if not cls.stages or not set(cls.stages) <= set(STAGES):
            raise TypeError(f"{cls.__name__}.stages must be a non-empty subset of {STAGES}, got {cls.stages!r}")
        cls.stages = tuple(stage for stage in STAGES if stage in cls.stages)   # in STAGES' order

    def patch_defaults(self) -> dict:
        """Patch-level settings (``metric``, ``prop_attn``) this reducer, as configured, runs with where the
        caller of ``vtr.patch`` gives none, e.g. what a paper's released code runs; empty: vtr's defaults."""
        return {}

    def max_removable(self, num_tokens: int, num_protected: int) -> int:
        """Most tokens one step may remove; at least one unprotected token always stays."""
        unprotected = num_tokens - num_protected
        return max(0, min(int(unprotected * self.max_step), unprotected - 1))

    def extra_macs(self, num_tokens: int, cost, num_kept: Optional[int] = None) -> float:
        """Multiply-accumulates the decision itself costs per image at a step from ``num_tokens`` to
        ``num_kept`` tokens (similarity matrices); ``cost`` is the model's :class:`~vtr.budget.cost.EncoderCost`
        (metric width, protected tokens, attention width, whether a CLS token exists). Without
        ``num_kept`` a cost that depends on it is counted at its largest."""
        return 0.0

    def default_layers(self, num_layers: int) -> Optional[list[int]]:
        """Where the method reduces when ``layers=`` is not given: None means every block."""
        return None

    def stage_counts(self, num_tokens: int, budget: int, num_stages: int) -> Optional[list[int]]:
        """Visual tokens an image of ``num_tokens`` keeps after each of ``num_stages`` in-LM stages for an int
        ``budget`` (the last count), when the method's paper fixes them (PyramidDrop's ratio per stage); None:
        vtr's geometric decay towards the budget (:func:`vtr.budget.visual.stage_budgets`)."""
        return None

    # The lowest keep ratio per step the default layers were chosen for (EViT's 0.5); None: no limit.
    # A flops= target that needs less at those layers reduces at ``deeper_target_layers`` instead.
    lowest_keep: ClassVar[Optional[float]] = None

    def deeper_target_layers(self, num_layers: int) -> Optional[list[int]]:
        """Default layers for a flops= target past ``lowest_keep`` at :meth:`default_layers`."""
        return None

    def fixed_amounts(self, cost, layers: Optional[list], flops: Optional[float]) -> Optional[tuple]:
        """Per-layer tokens removed when the reducer's own options fix them (``pool``'s factor), else
        None. ``cost`` is the adapter's EncoderCost, ``layers`` the user's validated layer list or None."""
        return None

    def kept_grid(self, grid: tuple) -> tuple[int, int]:
        """What a ``fixed_count`` reducer leaves of a (rows, cols) ``grid`` of tokens."""
        raise TypeError(f"{self.name} keeps the count it is given (a budget), not one set by its options")

    def for_budget(self, grid: tuple, num_protected: int, budget: int, options_given: bool) -> "Reducer":
        """A ``fixed_count`` reducer set to keep exactly ``budget`` tokens of ``grid`` (with ``num_protected``
        leading ones), or a ValueError that lists the counts it can keep. ``options_given``: the user set the
        options that fix the count (pool's ``factor=``), so the budget must agree with them."""
        raise TypeError(f"{self.name} keeps the count it is given (a budget), not one set by its options")

    def check_input(self, num_tokens: int, num_protected: int) -> None:
        """Raise a ValueError if the options cannot serve an input of ``num_tokens`` tokens entering the
        encoder, ``num_protected`` of them protected (ATF's prior holds one value per patch position).

        A schedule serves any input size, so ``vtr.patch`` cannot check this: the step checks every
        input it gets, and a tool that knows the input size (``vtr profile``, ``vtr visualize``) calls it
        before running anything, so the mistake is reported as the user's, not as a failed forward pass.
        """

    def build(self, width: int, counts: Sequence[int], num_protected: int) -> None:
        """Create the parameters of a learned reducer for one model: tokens ``width`` channels wide,
        ``counts`` tokens entering each block and after the last at the model's default input size
        (a block reduces where the count drops), ``num_protected`` leading tokens. Training-free
        reducers have nothing to build."""

    def forward(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        """Check the budget, then let the method decide; a step that keeps everything is a no-op."""
        check_budget(self, state, num_kept)
        if num_kept == state.num_tokens:
            return state
        return self.step(state, num_kept, signals)

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        """The method itself, called with ``num_kept < state.num_tokens`` and within its budget."""
        raise NotImplementedError


REDUCERS: dict[str, type[Reducer]] = {}


def register(cls: type[Reducer]) -> type[Reducer]:
    REDUCERS[cls.name] = cls
    return cls


def check_budget(reducer: Reducer, state: TokenState, num_kept: int) -> None:
    """A budget outside what the reducer can reach is a bug in the caller, never clipped silently."""
    low = state.num_tokens - reducer.max_removable(state.num_tokens, state.num_protected)
    if not low <= num_kept <= state.num_tokens:
        raise ValueError(
            f"{reducer.name}: num_kept must be in [{low}, {state.num_tokens}] for {state.num_tokens} tokens "
            f"with {state.num_protected} protected, got {num_kept}"
        )


def check_number(reducer: Reducer, name: str, value, allowed: str,
                 within: Callable[[Union[int, float]], bool] = lambda value: True,
                 integer: bool = False) -> Union[int, float]:
    """The option ``name`` as a Python number, or a ValueError ``"<method>: <name> must be <allowed>, got
    <value>"``. It must be a real number (an int where ``integer``), finite, and ``within`` its range.

    Checked before any ``int()``, ``float()`` or comparison: those would answer a string with Python's own
    words, which name no option ("invalid literal for int()"), and quietly turn ``1.5`` into 1 or ``True``
    into 1. numpy and 0-d tensor scalars are the numbers they hold, as in ``vtr.make_reducer``.
    """
    value = plain_scalar(value)
    kinds = int if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds)
            or (isinstance(value, float) and not math.isfinite(value)) or not within(value)):
        raise ValueError(f"{reducer.name}: {name} must be {allowed}, got {value!r}")
    return value


def check_finite(reducer: Reducer, name: str, values: Tensor, meaning: str = "") -> None:
    """A user-given tensor (prior, projection) with NaN or Inf is an error when the reducer is built.

    Checked once, here: a NaN would otherwise flow into every score and tie all of them, and top-k
    or greedy selection on NaN picks arbitrary (even repeated) tokens without a word.
    """
    if bool(torch.isfinite(values).all()):
        return
    bad = int((~torch.isfinite(values)).sum())
    what = f" ({meaning})" if meaning else ""
    raise ValueError(f"{reducer.name}: {name} must be finite{what}, got {bad} NaN or Inf of {values.numel()} "
                     "values")


def dest_from_choice(
    state: TokenState,
    kept: Tensor,
    merged_from: Optional[Tensor] = None,
    merged_into: Optional[Tensor] = None,
) -> Tensor:
    """Destination map from a choice over the unprotected tokens.

    Indices are relative to the first unprotected token. ``kept`` ``[B, K]`` lists the tokens that
    survive, in output order (sorted indices keep spatial order). Token ``merged_from[b, i]`` is
    merged into the kept token ``merged_into[b, i]``; every other token is dropped.
    Protected tokens keep their places.
    """
    batch = state.x.shape[0]
    protected, unprotected = state.num_protected, state.num_tokens - state.num_protected
    device = kept.device
    rel = torch.full((batch, unprotected), -1, dtype=torch.long, device=device)
    positions = torch.arange(kept.shape[1], device=device).expand(batch, -1)
    rel.scatter_(1, kept, protected + positions)
    if merged_from is not None:
        rel.scatter_(1, merged_from, rel.gather(1, merged_into))
    head = torch.arange(protected, device=device).expand(batch, protected)
    return torch.cat([head, rel], dim=1)


def unit(metric: Tensor) -> Tensor:
    """Rows scaled to unit length, in float32 (cosine similarity under autocast stays finite)."""
    return F.normalize(metric.float(), dim=-1, eps=1e-6)
