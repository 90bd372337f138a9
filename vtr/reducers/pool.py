"""2-D average pooling of the patch grid: the compression most VLM projectors use, as a baseline."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..core.state import TokenState
from .base import Reducer, Signals, check_number, register


# pool's count is fixed by its factor, so a flops= target can only pick the layer; further than this
# from the target, a silent "nearest" would be a wrong answer.
FLOPS_TOLERANCE = 0.05


@register
class GridPool(Reducer):
    """Average ``factor x factor`` windows of the patch grid into one token each.

    Windows are size-weighted (padding weighs nothing), so total size and the size-weighted feature
    sum are conserved; a grid that ``factor`` does not divide gets smaller windows at its bottom and
    right edges. Protected tokens keep their places. The pooled tokens stay in row-major order.

    Its token count is set by ``factor`` and the grid (``signals.grid``, known only while the tokens
    are still in spatial order), not by a budget, so it pools once and takes no ``r=``/``keep=``:

    - ``vtr.patch(model, "pool", factor=2)`` pools before the MLP of block 0;
      ``layers=[i]`` pools at block ``i`` instead (one layer only).
    - ``flops=f`` picks, among ``layers`` (default: all), the block to pool at whose analytic MACs
      are closest to ``f``, and refuses when none lands within ``FLOPS_TOLERANCE`` of it (check
      ``vtr.expected_flops(model)`` for the value it landed on).

    The ``num_kept`` it is called with only gates whether this layer pools (any value below the
    token count); the count itself always follows the real grid, also at other input sizes.

    At an input size other than the model's default, the pooled count follows the real grid.
    """

    name = "pool"
    description = "average-pool the patch grid by an integer factor (baseline; count set by factor)"
    paper = ""
    stages = ("tower", "before_lm", "in_lm")
    max_step = 1.0
    fixed_count = True

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = check_number(self, "factor", factor, "an integer >= 2", lambda f: f >= 2, integer=True)

    def pooled_grid(self, grid: tuple) -> tuple[int, int]:
        return math.ceil(grid[0] / self.factor), math.ceil(grid[1] / self.factor)

    kept_grid = pooled_grid

    def for_budget(self, grid: tuple, num_protected: int, budget: int, options_given: bool) -> "GridPool":
        """The pool that keeps exactly ``budget`` tokens of ``grid`` (the smallest factor that does), this one if
        ``factor=`` was given and agrees, else a ValueError with the budgets pooling can keep."""
        counts = self.budgets(grid, num_protected)
        rule = (f"pool keeps {'1 + ' if num_protected else ''}ceil({grid[0]}/f) * ceil({grid[1]}/f) tokens per image "
                f"for factor f (f=1: none pooled), so budget must be one of {', '.join(map(str, counts))}")
        if options_given:
            kept = num_protected + math.prod(self.pooled_grid(grid))
            if kept != budget:
                raise ValueError(f"budget={budget} disagrees with factor={self.factor}, which keeps {kept} visual "
                                 f"tokens per image: {rule} (or leave out budget= or factor=)")
            return self
        if budget not in counts:
            raise ValueError(f"method 'pool' cannot keep budget={budget} visual tokens per image on this model: {rule}")
        return self if counts[budget] == 1 else GridPool(factor=counts[budget])

    @staticmethod
    def budgets(grid: tuple, num_protected: int = 0) -> dict[int, int]:
        """Token counts pooling can keep on ``grid`` (rows, cols) with ``num_protected`` leading tokens,
        each with the smallest factor that keeps it, largest count first (factor 1: nothing pooled)."""
        counts: dict[int, int] = {}
        for factor in range(1, max(grid) + 1):
            count = num_protected + math.ceil(grid[0] / factor) * math.ceil(grid[1] / factor)
            counts.setdefault(count, factor)
        return counts

    def fixed_amounts(self, cost, layers: Optional[list], flops: Optional[float]) -> tuple:
        if cost.grid is None:
            raise ValueError("pool needs the patch grid, and this model's adapter does not report one")
        rows, cols = self.pooled_grid(cost.grid)
        remove = cost.num_tokens - cost.num_protected - rows * cols

        def amounts(layer: int) -> tuple:
            return tuple(remove if i == layer else 0 for i in range(cost.num_layers))

        if flops is None:
            if layers is not None and len(layers) != 1:
                raise ValueError(f"pool pools once (the grid is gone afterwards): give one layer, got layers={layers}")
            return amounts(layers[0] if layers else 0)
        if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0.0 < flops <= 1.0:
            raise ValueError(f"flops must be a fraction in (0, 1] of the unreduced model's FLOPs, got {flops!r}")
        base = cost.unreduced()

        def fraction(layer: int) -> float:
            counts = [cost.num_tokens] * (layer + 1) + [cost.num_tokens - remove] * (cost.num_layers - layer)
            return cost.total(counts, decision_macs=lambda n, m: self.extra_macs(n, cost, m)) / base

        candidates = layers if layers is not None else range(cost.num_layers)
        best = min(candidates, key=lambda layer: (abs(fraction(layer) - flops), layer))
        if abs(fraction(best) - flops) > FLOPS_TOLERANCE:
            reachable = ", ".join(f"{fraction(layer):.3f}" for layer in candidates)
            raise ValueError(
                f"flops={flops:g} is out of reach for 'pool' with factor={self.factor}: pooling once gives "
                f"one of [{reachable}] (by layer); the allowed range is within {FLOPS_TOLERANCE} of those "
                "(pass layers=[i] to pool at a chosen layer)")
        return amounts(best)

    @staticmethod
    def _no_grid(state: TokenState) -> str:
        """Why there is no grid: an earlier step reduced the tokens (the order is wrong), or the adapter
        could not read the patch grid of this call (the input is the problem, not the order)."""
        patches = state.num_tokens - state.num_protected
        if state.is_reduced:
            return (f"pool needs signals.grid, and these tokens are no longer the patch grid (an earlier step "
                    f"reduced {state.num_original} tokens to {state.num_tokens}); pool must be the first reduction "
                    "step of the model")
        return (f"pool needs signals.grid, and the patch grid of this input is unknown: the model's adapter reads "
                f"rows x cols from the patch embedding of each call, and for this call it found no grid of {patches} "
                "patch tokens (patches dropped before the blocks, e.g. by patch dropout in training, or an "
                "embedding that is not a plain patch grid)")

    def step(self, state: TokenState, num_kept: int, signals: Signals) -> TokenState:
        if signals.grid is None:
            raise ValueError(self._no_grid(state))
        grid_rows, grid_cols = signals.grid
        protected = state.num_protected
        if grid_rows * grid_cols != state.num_tokens - protected:
            raise ValueError(f"pool: grid {grid_rows}x{grid_cols} does not match the "
                             f"{state.num_tokens - protected} unprotected tokens")
        rows, cols = self.pooled_grid(signals.grid)
        device = state.x.device
        window_row = torch.arange(grid_rows, device=device) // self.factor
        window_col = torch.arange(grid_cols, device=device) // self.factor
        window = (window_row[:, None] * cols + window_col[None, :]).flatten() + protected
        head = torch.arange(protected, device=device)
        dest = torch.cat([head, window]).expand(state.x.shape[0], -1)
        return state.reduce(dest, protected + rows * cols)
