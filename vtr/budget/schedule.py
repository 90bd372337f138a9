"""How much each layer reduces: `r=`, `keep=` or a `flops=` target solved analytically."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

from ..core.numbers import plain
from ..reducers.base import Reducer
from .cost import EncoderCost

RSpec = Union[int, Sequence[int], tuple]


@dataclass(frozen=True)
class Schedule:
    """Per-layer amounts: ``r`` tokens removed, or a ``keep`` fraction of unprotected tokens kept.

    Token counts are computed at run time from the tokens that actually arrive, so one schedule
    serves any input size; no layer removes more than its reducer allows in one step.
    """

    kind: Literal["r", "keep"]
    amounts: tuple  # one per layer; r=0 / keep=1.0 means the layer does not reduce

    def num_kept(self, layer: int, num_tokens: int, num_protected: int, max_removable: int) -> int:
        amount = self.amounts[layer]
        if self.kind == "r":
            remove = int(amount)
        else:
            remove = num_tokens - num_protected - int(amount * (num_tokens - num_protected) + 0.5)
        return num_tokens - min(max(remove, 0), max_removable)

    def token_counts(self, reducer: Reducer, num_tokens: int, num_protected: int) -> list[int]:
        """Counts entering each layer plus the final count, as the model will see them."""
        counts = [num_tokens]
        for layer in range(len(self.amounts)):
            n = counts[-1]
            counts.append(self.num_kept(layer, n, num_protected, reducer.max_removable(n, num_protected)))
        return counts


def chosen_layers(layers: Optional[Sequence[int]], num_layers: int) -> list[int]:
    """``layers=`` as a list of block indices; None means every block.

    Indices must be ints: ``int(1.5)`` would quietly reduce at block 1, and a bool is no block.
    """
    if layers is None:
        return list(range(num_layers))
    allowed = f"[0, {num_layers - 1}]"
    layers = plain(layers, "layers")   # a numpy array or tensor with dimensions is an error here
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of distinct integer block indices in {allowed}, got {layers!r}")
    chosen = plain(list(layers), "layers")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in chosen):
        raise ValueError(f"layers must be integer block indices in {allowed}, got {chosen}")
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= i < num_layers for i in chosen):
        raise ValueError(f"layers must be distinct block indices in {allowed}, got {chosen}")
    return chosen


def _per_layer(values: Sequence, num_layers: int, chosen: list[int], name: str, off) -> tuple:
    """A per-layer list is the user's schedule, taken as it is. With ``layers=`` beside it, an entry
    that reduces outside those layers is a contradiction, refused (never rewritten to ``off``)."""
    if len(values) != num_layers:
        raise ValueError(f"{name} as a list needs one value per layer ({num_layers}), got {len(values)}")
    outside = [i for i, v in enumerate(values) if i not in chosen and v != off]
    if outside:
        raise ValueError(f"{name}={list(values)} reduces at block(s) {outside}, outside layers={chosen}: a per-layer "
                         f"list is the schedule itself, so leave out layers= or set those entries to {off}")
    return tuple(values)


def _is_per_layer(r, keep) -> bool:
    """``r=`` / ``keep=`` given as one value per layer (``r=(r, inflect)`` is not: it is a rule)."""
    return isinstance(r, (list, range)) or (keep is not None and not isinstance(keep, (int, float)))


def inflected(r: int, inflect: float, num_layers: int) -> list[int]:
    """ToMe's ``(r, inflect)`` schedule over ``num_layers`` reducing layers, as ToMe's ``parse_r`` computes it.

    The first layer removes ``int(r * (1 - inflect))`` tokens, the last ``2r`` minus that, the layers
    between lie on the line through both, each truncated (in ToMe's float arithmetic, so the counts are
    ToMe's to the token). inflect=-1 goes from 2r down to 0, 0 is a constant r, 1 goes from 0 up to 2r.
    One layer removes the first layer's count (where ToMe divides by zero).
    """
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    step = (last - first) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(first + step * i) for i in range(num_layers)]


def _r_amounts(r: RSpec, num_layers: int, chosen: list[int]) -> tuple:
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple means (r, inflect), got {r}; pass a list for per-layer values")
        base, inflect = r
        if isinstance(base, bool) or not isinstance(base, int) or base < 0:
            raise ValueError(f"r in r=(r, inflect) must be a non-negative int (tokens removed per layer on "
                             f"average), got {base!r}")
        if isinstance(inflect, bool) or not isinstance(inflect, (int, float)) or not -1.0 <= inflect <= 1.0:
            raise ValueError(f"inflect in r=(r, inflect) must be a number in [-1, 1], got {inflect!r}")
        per = dict(zip(chosen, inflected(base, float(inflect), len(chosen))))
        values = tuple(per.get(i, 0) for i in range(num_layers))
    elif isinstance(r, (list, range)):
        values = _per_layer(list(r), num_layers, chosen, "r", 0)
    else:
        values = tuple(r if i in chosen else 0 for i in range(num_layers))
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"r must be a non-negative int (tokens removed per layer), got {v!r}")
    return values


def _keep_amounts(keep, reducer: Reducer, num_layers: int, chosen: list[int]) -> tuple:
    """Per-layer keep fractions, checked before any float(): ``float(True)`` would be a silent 1.0. Only a
    list (or tuple, range) is one value per layer: a string is no list of characters."""
    if isinstance(keep, (list, tuple, range)):
        values = _per_layer(list(keep), num_layers, chosen, "keep", 1.0)
    else:
        values = tuple(keep if i in chosen else 1.0 for i in range(num_layers))
    _check_keep(values, reducer)
    return tuple(float(v) for v in values)


def _check_keep(values: tuple, reducer: Reducer) -> None:
    low = 1.0 - reducer.max_step
    for v in values:
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and low <= v <= 1.0 and v > 0):
            raise ValueError(
                f"keep must be a fraction in [{max(low, 0.0):g}, 1] for {reducer.name!r} "
                f"(at most {reducer.max_step:g} of the tokens can go in one step), got {v!r}"
            )


def reduced_macs(cost: EncoderCost, reducer: Reducer, tokens: Sequence[int]) -> float:
    """MACs per image at these token counts: the encoder's blocks plus the reducer's own decisions."""
    return cost.total(tokens, filters_input=reducer.acts_before_blocks,
                      decision_macs=lambda n, m: reducer.extra_macs(n, cost, m))


def solve_flops(target: float, reducer: Reducer, cost: EncoderCost, chosen: list[int]) -> Schedule:
    """Geometric schedule (the same keep ratio at every reducing layer) whose MACs hit the target.

    Measured on trained models here, a constant keep ratio beats a constant r at equal FLOPs
    (constant r squeezes the last layers to a handful of tokens), so that is what a target buys.
    Bisection over the ratio on the analytic count; counts are integers, so it lands within a
    token's worth of MACs of the target.

    A target of 1 is the unreduced model: nothing reduces. Every decision costs MACs of its own
    (similarity matrices), so removing a token or two per layer can cost more than it saves; no
    reduction is therefore always a candidate, and wins ties.
    """
    base = cost.unreduced()

    def schedule(ratio: float) -> Schedule:
        return Schedule("keep", tuple(ratio if i in chosen else 1.0 for i in range(cost.num_layers)))

    def fraction(ratio: float) -> float:
        counts = schedule(ratio).token_counts(reducer, cost.num_tokens, cost.num_protected)
        return reduced_macs(cost, reducer, counts) / base

    if target >= 1.0:
        return schedule(1.0)
    low, high = max(1.0 - reducer.max_step, 1e-4), 1.0
    reachable = fraction(low)
    if target < reachable - 1e-9:
        raise ValueError(
            f"flops={target:g} is out of reach for {reducer.name!r} on this model: the allowed range is "
            f"[{reachable:.3f}, 1] (at most {reducer.max_step:g} of the tokens go per layer"
            f"{'' if len(chosen) == cost.num_layers else f' and only layers {chosen} reduce'})"
        )
    for _ in range(60):
        mid = (low + high) / 2
        if fraction(mid) > target:
            high = mid
        else:
            low = mid
    # Of no reduction and the two bracketing ratios, take the one whose FLOPs land closest to the target.
    best = min((1.0, low, high), key=lambda k: abs(fraction(k) - target))
    return schedule(best)


def asks_for_nothing(r: Optional[RSpec] = None, keep=None, flops=None) -> bool:
    """The one amount given means "reduce nothing": ``r=0`` (or all zeros, or ``(0, inflect)``),
    ``keep=1`` (or all ones) or ``flops=1``. Bools are not amounts."""
    def every(values, target) -> bool:
        values = values if isinstance(values, (list, tuple, range)) else [values]
        return len(values) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == target
                                       for v in values)

    if isinstance(r, tuple) and len(r) == 2:   # (r, inflect): nothing when r is 0
        r = r[0]
    return ((r is not None and every(r, 0)) or (keep is not None and every(keep, 1))
            or (flops is not None and every(flops, 1)))


def make_schedule(
    reducer: Reducer,
    cost: EncoderCost,
    *,
    r: Optional[RSpec] = None,
    keep: Optional[Union[float, Sequence[float]]] = None,
    flops: Optional[float] = None,
    layers: Optional[Sequence[int]] = None,
) -> Schedule:
    """Turn exactly one of ``r=``, ``keep=``, ``flops=`` into a per-layer schedule.

    numpy and 0-d tensor scalars count as the Python numbers they hold (:func:`~vtr.core.numbers.plain`).
    An amount that asks for nothing (``r=0``, ``keep=1``, ``flops=1``) gives a schedule that reduces
    nowhere, for every method that can express that.
    """
    r, keep, flops = plain(r, "r"), plain(keep, "keep"), plain(flops, "flops")
    given = [name for name, v in (("r", r), ("keep", keep), ("flops", flops)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one amount, r=, keep= or flops=; got {' and '.join(given)}")
    num_layers = cost.num_layers
    defaults = layers is None
    # The method's own default layers (EViT's, ATF's filter before block 0), else every block; a per-layer
    # list of amounts says itself where it reduces.
    if defaults and not _is_per_layer(r, keep):
        layers = reducer.default_layers(num_layers)
    chosen = chosen_layers(layers, num_layers)
    nothing = asks_for_nothing(r, keep, flops)
    if reducer.identity:  # the 'none' method
        if given and not nothing:
            raise ValueError(f"method {reducer.name!r} does not reduce; leave out {given[0]}= (or set r=0)")
        return Schedule("r", (0,) * num_layers)
    fixed = reducer.fixed_amounts(cost, None if layers is None else chosen, None if nothing else flops)
    if fixed is not None:
        return _fixed_schedule(reducer, fixed, given, nothing, {"r": r, "keep": keep, "flops": flops})
    if not given:
        raise ValueError(f"method {reducer.name!r} needs an amount: r= (tokens per layer), keep= "
                         "(fraction kept per layer) or flops= (target fraction of the model's FLOPs)")
    if r is not None:
        return Schedule("r", _r_amounts(r, num_layers, chosen))
    if keep is not None:
        return Schedule("keep", _keep_amounts(keep, reducer, num_layers, chosen))
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0.0 < flops <= 1.0:
        raise ValueError(f"flops must be a fraction in (0, 1] of the unreduced model's FLOPs, got {flops!r}")
    if defaults:
        return _solve_over_default_layers(float(flops), reducer, cost, chosen)
    return solve_flops(float(flops), reducer, cost, chosen)


def _solve_over_default_layers(target: float, reducer: Reducer, cost: EncoderCost, chosen: list[int]) -> Schedule:
    """A flops= target over the method's default layers, or over its layers for deeper targets when the
    defaults would need a keep ratio below the one they were chosen for (``reducer.lowest_keep``), or
    cannot reach the target at all."""
    deeper = reducer.deeper_target_layers(cost.num_layers)
    if deeper is None or reducer.lowest_keep is None:
        return solve_flops(target, reducer, cost, chosen)
    try:
        schedule = solve_flops(target, reducer, cost, chosen)
    except ValueError:   # out of reach of the defaults: the deeper layers say how far they reach
        schedule = None
    if schedule is not None and min(schedule.amounts) >= reducer.lowest_keep:
        return schedule
    schedule = solve_flops(target, reducer, cost, deeper)
    if min(schedule.amounts) >= reducer.lowest_keep:
        return schedule
    # Past the keep range at every one of them (a shallow model, a low target): one step at the first keeps more
    # tokens to the end than several that leave two. Measured on the 6-block fidelity ViT at 35% FLOPs, evit's
    # blocks 1, 3, 4 ended with 2 tokens and 55.4% top-1; block 1 alone, 5 tokens and 79.5% (unreduced 85.4%).
    try:
        single = solve_flops(target, reducer, cost, deeper[:1])
    except ValueError:   # one step cannot reach it: the several steps can
        return schedule

    def final_tokens(candidate: Schedule) -> int:
        return candidate.token_counts(reducer, cost.num_tokens, cost.num_protected)[-1]

    return single if final_tokens(single) > final_tokens(schedule) else schedule


def _fixed_schedule(reducer: Reducer, fixed: tuple, given: list, nothing: bool, amounts: dict) -> Schedule:
    """The schedule of a method whose options fix its token count (``pool``'s factor): an amount can
    only pick where it reduces, never that it does not."""
    if nothing:
        name = given[0]
        raise ValueError(
            f"method {reducer.name!r} always reduces: its token count is set by its options, so no amount means "
            f"'no reduction' (got {name}={amounts[name]!r}); for the unreduced model use method 'none' or "
            "vtr.unpatch(model)")
    if amounts["r"] is not None or amounts["keep"] is not None:
        raise ValueError(f"method {reducer.name!r} sets its own token count from its options; "
                         f"leave out {'r' if amounts['r'] is not None else 'keep'}=")
    return Schedule("r", tuple(fixed))
