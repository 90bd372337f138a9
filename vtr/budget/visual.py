"""Visual-token budgets of vision-language models, solved in one place.

``vtr.patch(vlm, method, budget=B, layers=..., frames=..., temporal=...)`` becomes a :class:`VisualPlan` (the
typed settings a patched VLM holds, beside its schedule) and, from it, every count a call needs:

- before the language model, an image keeps ``min(B, its count)`` (:func:`item_budget`; a fixed-count reducer
  such as ``pool`` keeps what its options leave of the image's grid); a video spends B across its frames
  (``frames=``, after merging across frames with ``temporal=``: ``vtr.adapters.vlm.video``);
- inside the language model (``layers=[K1, ..., Km]``), B is the count after the last stage and the stages before
  decay geometrically towards it (:func:`stage_budgets`, p-MoD), or a list gives every stage's count; images of
  any size take their own (:func:`image_budgets`);
- an AnyRes image's budget is shared by its thumbnail and crops (:func:`split_budget`), a video's by its frames
  (:func:`frame_budgets`);
- each count is reached in as many reducer steps as the reducer's ``max_step`` allows (:func:`reduction_steps`).

The schedule a patched VLM reports is these steps on a reference image (:func:`schedule`). Nothing here knows a
model family: the adapters say how many tokens an image has and where they go.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..reducers.base import Reducer
from ..reducers.drop import allocate
from ..reducers.video import FRAME_SPLITS
from .schedule import Schedule

Budget = Union[int, Sequence[int]]
POSITIONS = ("original", "compact")   # what a compacted prompt's tokens are numbered by (VisualPlan.positions)


@dataclass(frozen=True)
class VisualPlan:
    """What a patched vision-language model keeps (settings, checked): ``budget`` visual tokens per image or
    video (an int, a list of one count per in-LLM stage, or None for ``none`` / ``pool``), the language-model
    ``layers`` it prunes at (None: before the language model), and how a video spends its budget
    (``frames``: its split across frames, ``temporal``: the fraction kept after merging across frames), the
    positions the language model gives a compacted prompt (``"compact"``: consecutive; ``"original"``: each kept
    token's position in the caller's prompt, where the family offers it), and ``tower_layer``: the vision block
    after which a family that can reduces inside its tower (Qwen-VL), None where it reduces the tower's output
    (the family checks it against its tower)."""

    budget: Optional[Union[int, tuple]] = None
    layers: Optional[tuple] = None
    frames: str = "uniform"
    temporal: Optional[float] = None
    positions: str = "compact"
    tower_layer: Optional[int] = None

    def __post_init__(self) -> None:
        if self.frames not in FRAME_SPLITS:
            raise ValueError(f"frames must be one of {', '.join(FRAME_SPLITS)} (how a video's budget is split across "
                             f"its frames), got {self.frames!r}")
        temporal = self.temporal
        if temporal is not None and (isinstance(temporal, bool) or not isinstance(temporal, (int, float))
                                     or not 0.0 < temporal <= 1.0):
            raise ValueError(f"temporal must be a fraction in (0, 1] (of a video's tokens kept after merging across "
                             f"frames), got {temporal!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(map(repr, POSITIONS))} (the positions of the kept "
                             f"tokens before the language model), got {self.positions!r}")

    @classmethod
    def given(cls, budget=None, layers=None, frames: Optional[str] = None,
              temporal: Optional[float] = None, tower_layer: Optional[int] = None) -> "VisualPlan":
        """The plan of ``vtr.patch``'s keywords (lists as tuples, ``frames`` left out: ``"uniform"``)."""
        return cls(budget=tuple(budget) if isinstance(budget, (list, tuple)) else budget,
                   layers=None if layers is None else tuple(layers) if isinstance(layers, (list, tuple)) else layers,
                   frames=frames or "uniform", temporal=temporal, tower_layer=tower_layer)

    @property
    def in_llm(self) -> bool:
        """Pruning happens inside the language model (``layers=`` given)."""
        return self.layers is not None

    @property
    def in_tower(self) -> bool:
        """Reduction happens inside the vision tower (``tower_layer=`` given)."""
        return self.tower_layer is not None

    @property
    def video_options_given(self) -> bool:
        return self.frames != "uniform" or self.temporal is not None


def check_video(reducer: Reducer, plan: VisualPlan) -> None:
    """What cannot be combined for videos, refused at patch time."""
    if plan.temporal is not None and reducer.fixed_count:
        raise ValueError(f"method {reducer.name!r} keeps what its options leave of each frame's grid, which merging "
                         "across frames (temporal=) breaks up: leave out temporal=")


# -- counts and steps ----------------------------------------------------------------------------------

def reduction_steps(num_tokens: int, budget: int, reducer: Reducer, num_protected: int) -> list[int]:
    """Tokens each step removes to go from ``num_tokens`` to ``budget`` within the reducer's ``max_step``."""
    steps, n = [], num_tokens
    while n > budget:
        removable = reducer.max_removable(n, num_protected)
        if removable == 0:
            raise ValueError(
                f"method {reducer.name!r} cannot remove tokens, so it cannot keep budget={budget} of {num_tokens}"
            )
        kept = max(budget, n - removable)
        steps.append(n - kept)
        n = kept
    return steps


def step_counts(num_tokens: int, steps: list[int]) -> list[int]:
    """Token count entering each step (tokens removed per step), then the count kept."""
    tokens = [num_tokens]
    for remove in steps:
        tokens.append(tokens[-1] - remove)
    return tokens


def item_budget(plan: VisualPlan, reducer: Reducer, num_tokens: int, num_suffix: int = 0,
                grid: Optional[tuple] = None) -> int:
    """Tokens one image keeps before the language model: ``min(budget, its count)``, its ``num_suffix`` tokens
    that always stay (a newline after it) counted in the budget; a fixed-count reducer keeps what its options
    leave of the image's (frames, rows, cols) ``grid``."""
    if reducer.fixed_count:
        if grid is None:
            raise ValueError(f"method {reducer.name!r} pools an image's patch grid, and these images' tokens form none "
                             "(packed AnyRes crops with newlines): choose a method that takes budget=")
        if grid[0] != 1:
            return num_tokens
        rows, cols = reducer.kept_grid(grid[1:])
        return rows * cols
    if plan.budget is None:
        return num_tokens
    return max(1, min(plan.budget - num_suffix, num_tokens))


def stage_layers(layers, num_layers: int) -> list[int]:
    """``layers=`` as a list of strictly increasing decoder layers in ``[0, num_layers)``."""
    chosen = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    valid = bool(chosen) and all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < num_layers
                                 for k in chosen)
    if not valid or any(b <= a for a, b in zip(chosen[:-1], chosen[1:])):
        raise ValueError(f"layers must be language-model layers [K] or strictly increasing [K1, K2, ...] with each "
                         f"K in [0, {num_layers - 1}] (where in-LLM pruning happens), got {layers!r}")
    return chosen


def stage_budgets(budget: Budget, num_tokens: int, num_protected: int, num_stages: int,
                  reducer: Optional[Reducer] = None) -> list[int]:
    """Visual tokens kept per image after each stage.

    An int is the count after the last stage; the stages before decay geometrically towards it
    (p-MoD): after stage i, ``round(N * (B / N) ** (i / m))``, unless the ``reducer`` fixes its own
    (:meth:`~vtr.reducers.base.Reducer.stage_counts`, e.g. PyramidDrop's ratio per stage). A list gives
    every stage's count.
    """
    low = num_protected + 1

    def is_count(b) -> bool:
        return isinstance(b, int) and not isinstance(b, bool) and low <= b <= num_tokens

    if isinstance(budget, (list, tuple)):
        counts = list(budget)
        if not (len(counts) == num_stages and all(map(is_count, counts))
                and all(b <= a for a, b in zip(counts[:-1], counts[1:]))):
            raise ValueError(
                f"budget as a list must give one count per layer in layers= ({num_stages}), non-increasing, each an "
                f"int in [{low}, {num_tokens}] (visual tokens kept per image after that layer), got {list(budget)!r}")
        return counts
    if not is_count(budget):
        raise ValueError(f"budget must be an int in [{low}, {num_tokens}] (visual tokens kept per image after the "
                         f"last layer; this model gives at most {num_tokens} per image), or a list of {num_stages}, "
                         f"got {budget!r}")
    own = None if reducer is None else reducer.stage_counts(num_tokens, budget, num_stages)
    if own is not None:
        return list(own)
    return [max(budget, round(num_tokens * (budget / num_tokens) ** (i / num_stages)))
            for i in range(1, num_stages + 1)]


def image_budgets(budget: Budget, num_tokens: int, num_protected: int, num_stages: int,
                  reducer: Optional[Reducer] = None) -> list[int]:
    """Visual tokens one image of ``num_tokens`` keeps after each stage (``budget`` already checked
    against the largest image): a list's counts capped at the image's own; an int is the count after
    the last stage, the stages before decaying from the image's own count (:func:`stage_budgets`);
    an image with at most ``budget`` tokens keeps them all."""
    if isinstance(budget, (list, tuple)):
        return [min(count, num_tokens) for count in budget]
    if num_tokens <= budget:
        return [num_tokens] * num_stages
    return stage_budgets(budget, num_tokens, num_protected, num_stages, reducer)


# -- how one image's or video's budget is shared by its parts ----------------------------------------------

def split_budget(available: int, base_tokens: int, crop_tokens: list[int],
                 crop_weights: Tensor) -> tuple[int, list[int]]:
    """(base budget, budget per crop) summing to ``available`` tokens (the image's budget less its newline).

    The base's share follows its token count (at least 1, leaving at least 1 for the crops); the
    crops split the rest by ``crop_weights``, capped at their tokens (largest remainder, exact).
    """
    content = base_tokens + sum(crop_tokens)
    if not 2 <= available < content:
        raise ValueError(f"split_budget: available must be in [2, {content - 1}], got {available}")
    base = min(max(1, math.floor(available * base_tokens / content + 0.5)), available - 1)
    capacity = torch.tensor([crop_tokens], dtype=torch.float64)
    crops = allocate(crop_weights.double().reshape(1, -1), capacity, torch.tensor([available - base]))
    return base, crops[0].tolist()


def frame_budgets(budget: int, frame_tokens: Tensor, weights: Tensor) -> Tensor:
    """``[T]`` tokens each frame keeps: ``budget`` in all (at most the tokens there are), every frame at least
    one while the budget allows (temporal coverage), the rest in proportion to ``weights``, capped at each
    frame's ``frame_tokens`` (``vtr.reducers.drop.allocate``: exact, largest remainder)."""
    frame_tokens = frame_tokens.long()
    total = min(int(budget), int(frame_tokens.sum()))
    present = frame_tokens > 0
    if total < int(present.sum()):   # fewer tokens than frames: the heaviest frames get one each
        order = weights.masked_fill(~present, -1.0).argsort(descending=True, stable=True)[:total]
        return torch.zeros_like(frame_tokens).scatter_(0, order, 1)
    floor = present.long()
    rest = allocate(weights[None].clamp_min(0.0), (frame_tokens - floor)[None].double(),
                    torch.tensor([total - int(floor.sum())]))[0]
    return floor + rest.to(floor.device)


# -- the schedule a patched VLM reports: the steps of a reference image --------------------------------

_STAGE_WORDS = {"tower": "in the vision tower", "before_lm": "before the language model", "in_lm": "inside it"}


def schedule(reducer: Reducer, plan: VisualPlan, *, num_tokens: int, num_protected: int = 0, num_layers: int,
             any_size: bool, family: str, low: Optional[int] = None) -> Schedule:
    """``plan`` as reduction steps on a reference image of ``num_tokens`` visual tokens (``num_protected`` of
    them never reduced; ``num_layers`` decoder layers for ``layers=``).

    ``any_size``: images have any count (Qwen-VL, LLaVA-OneVision / NeXT-Video): any budget >= 1 is an image's
    ``min(budget, its count)``, and a fixed-count reducer takes its options (not a budget). Otherwise every image
    has ``num_tokens`` and a budget must lie in ``[low, num_tokens]`` (``low`` default: one past the protected).
    """
    budget = plan.budget
    if plan.in_llm:
        if reducer.stages and "in_lm" not in reducer.stages:   # () says nothing: the method runs wherever it is put
            where = " and ".join(_STAGE_WORDS[stage] for stage in reducer.stages)
            raise ValueError(f"method {reducer.name!r} applies {where}, not inside the language model: "
                             "leave out layers=")
        if plan.video_options_given:
            raise ValueError("frames= and temporal= split a video's budget before the language model: leave them out "
                             "with layers= (in-LLM pruning ranks all of a video's tokens at once)")
        if reducer.fixed_count and any_size:
            raise ValueError(f"method {reducer.name!r} keeps a count set by its options: it reduces before the "
                             f"language model on {family}: leave out layers=")
        num_stages = len(stage_layers(plan.layers, num_layers))
        if not reducer.identity and budget is not None:
            return _stage_schedule(reducer, budget, num_tokens, num_protected, num_stages, any_size)
    if reducer.identity:
        if budget not in (None, *(() if any_size else (num_tokens,))):
            keep_all = "" if any_size else f" (or set budget={num_tokens})"
            raise ValueError(f"method {reducer.name!r} does not reduce; leave out budget={keep_all}")
        return Schedule("r", (0,))
    if reducer.fixed_count and any_size:
        if budget is not None:
            raise ValueError(f"method {reducer.name!r} keeps what its options leave of each image's own grid (pool: "
                             "ceil(rows/f) * ceil(cols/f) tokens), so it takes factor=, not budget=")
        side = int(round(num_tokens ** 0.5))
        rows, cols = reducer.kept_grid((side, side))
        return Schedule("r", (num_tokens - rows * cols,))
    low = num_protected + 1 if low is None else low
    if budget is None:
        allowed = ">= 1" if any_size else f"{low}..{num_tokens}"
        raise ValueError(f"method {reducer.name!r} needs budget= (visual tokens kept per image"
                         f"{' or video' if any_size else ''}, {allowed})")
    if any_size:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an int >= 1 (visual tokens kept per image or video; an image with fewer "
                             f"passes untouched), got {budget!r}")
    elif isinstance(budget, bool) or not isinstance(budget, int) or not low <= budget <= num_tokens:
        raise ValueError(f"budget must be an int in [{low}, {num_tokens}] (visual tokens kept per image; this model "
                         f"gives at most {num_tokens} per image), got {budget!r}")
    kept = min(budget, num_tokens)
    return Schedule("r", tuple(reduction_steps(num_tokens, kept, reducer, num_protected)) or (0,))


def _stage_schedule(reducer: Reducer, budget: Budget, num_tokens: int, num_protected: int, num_stages: int,
                    any_size: bool) -> Schedule:
    """In-LLM stages: every stage's steps on the reference image, one stage after the other."""
    if any_size:
        counts = budget if isinstance(budget, (list, tuple)) else [budget]
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in counts):
            raise ValueError(f"budget must be an int >= 1 or a list of {num_stages} (visual tokens kept per image or "
                             f"video after each layer in layers=), got {budget!r}")
        largest = max(num_tokens, *counts)   # checks a list's length and order against any image's size
        budgets = [min(kept, num_tokens) for kept in stage_budgets(budget, largest, num_protected, num_stages,
                                                                   reducer)]
    else:
        budgets = stage_budgets(budget, num_tokens, num_protected, num_stages, reducer)
    steps, entering = [], num_tokens
    for kept in budgets:
        steps += reduction_steps(entering, kept, reducer, num_protected)
        entering = kept
    return Schedule("r", tuple(steps) or (0,))
