"""What every LLaVA path shares: the per-call run, image token counts, costs, the report, prompt compaction.

Imports no other module of this package: ``before_lm``, ``anyres`` and ``in_llm`` build on it, and the
front (``__init__``) on all of them.

Image token counts: LLaVA-1.5 gives every image the same count (the vision tower's patch grid);
LLaVA-NeXT packs each image by its own size (:func:`layout`, read from the model's own packing), so the
count is per image and the settings use the most one image can have (:func:`largest_image_tokens`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vtr.budget.cost import EncoderCost
from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.run import Report, Run
from vtr.core.signals import Need, Signals
from vtr.core.state import TokenState
from vtr.reducers.base import Reducer

from ..errors import UnsupportedModelError
from ..steps import linear_macs

WHERE = "before the language model (projector output, per image)"
VISION_KEYS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


# -- which model -------------------------------------------------------------------------------------

def llava_classes() -> tuple:
    try:
        from transformers import LlavaForConditionalGeneration, LlavaModel
    except ImportError:  # transformers is optional for vtr
        return ()
    return LlavaForConditionalGeneration, LlavaModel


def is_next(model: nn.Module) -> bool:
    """``model`` is LLaVA-NeXT (AnyRes: a thumbnail plus crops, a token count per image)."""
    try:
        from transformers import LlavaNextForConditionalGeneration
    except ImportError:  # transformers is optional for vtr
        return False
    return isinstance(model, LlavaNextForConditionalGeneration)


# -- the per-call run ----------------------------------------------------------------------------------

@dataclass(eq=False)
class LlavaRun(Run):
    """One call of a patched LLaVA: a ``forward``, or a whole ``generate()`` (prefill and every decode
    step share it, so they share what the prefill decided).

    Besides what :class:`vtr.core.run.Run` holds (the call's query from ``vtr.conditioned``, the vision
    tower's q/k kept by the ``KeepQK`` hooks), the in-LLM path keeps its pruning of the prompt here
    (``in_llm.Pruning``). Dropped when the call ends; only the detached report outlives it.
    """

    pruning: Optional[object] = None


@contextmanager
def opened(model: nn.Module) -> Iterator[LlavaRun]:
    """The run of this call of ``model``: the one already open (a forward inside ``generate()``), or a new one."""
    reduction = model._vtr
    run = runs.active(reduction)
    if isinstance(run, LlavaRun):
        yield run
        return
    run = LlavaRun(reduction, query=runs.query_of(reduction))
    try:
        with runs.bound(run):
            yield run
    finally:
        run.captured.clear()
        run.pruning = None


# -- LLaVA-NeXT packing: where each of an image's features comes from -------------------------------

@dataclass(frozen=True)
class AnyresLayout:
    """Where each of one LLaVA-NeXT image's packed features comes from.

    source: ``[N]`` per packed feature ``part * part_tokens + index in the part``, -1 for a newline.
        Part 0 is the base image, part ``1 + c`` crop ``c`` (crops in row-major order).
    rows, cols: the unpadded crop map (one newline closes each row).
    """

    image_size: tuple[int, int]
    source: Tensor
    side: int                 # the base image and every crop are side x side token grids
    num_crops: int
    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        return self.source.numel()

    @property
    def part_tokens(self) -> int:
        return self.side * self.side

    @property
    def part(self) -> Tensor:
        """``[N]`` part of each packed feature, -1 for newlines."""
        return torch.where(self.source >= 0, self.source // self.part_tokens, -1)

    def positions(self, part: int) -> Tensor:
        """Packed positions of ``part``'s tokens (row-major within its region)."""
        return (self.part == part).nonzero()[:, 0]

    def map_position(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(row, col) in the unpadded crop map of packed crop-token positions."""
        offset = positions - self.part_tokens
        return offset // (self.cols + 1), offset % (self.cols + 1)

    def reduces(self, budget: Optional[int]) -> bool:
        """Whether ``budget`` makes this image's thumbnail and crop tokens be reduced (not only newlines dropped)."""
        return budget is not None and budget < self.num_tokens and budget <= self.num_tokens - self.rows

    def crop_tokens(self) -> list[int]:
        counts = torch.bincount(self.part[self.part > 0] - 1, minlength=self.num_crops)
        return counts.tolist()

    def grid(self, part: int) -> tuple[int, int]:
        """(rows, cols) of ``part``'s region: a full grid for the base, a cut one for a crop."""
        if part == 0:
            return self.side, self.side
        rows, cols = self.map_position(self.positions(part))
        return rows.unique().numel(), cols.unique().numel()


def layout(model: nn.Module, image_size) -> AnyresLayout:
    """The packed layout of an image of ``image_size`` (height, width), from the model's own packing."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    image_size = tuple(int(v) for v in image_size)
    side = config.vision_config.image_size // config.vision_config.patch_size
    num_parts = image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    ids = torch.arange(num_parts * side * side, dtype=torch.float64).view(num_parts, side * side, 1)
    newline = torch.tensor([-1.0], dtype=torch.float64)
    packed, _ = model.model.pack_image_features([ids], [list(image_size)], "default", image_newline=newline)
    source = packed[0][:, 0].long()
    rows = int((source < 0).sum())     # 0 for an image so thin that unpadding leaves no row
    cols = (source.numel() - side * side - rows) // rows if rows else 0
    return AnyresLayout(image_size, source, side, num_parts - 1, rows, cols)


_LARGEST: dict = {}   # largest_image_tokens per (packing, pinpoints, image size, patch size): asked at every call


def largest_image_tokens(model: nn.Module) -> int:
    """Most tokens one LLaVA-NeXT image can have: an image of a pinpoint's own size fills its grid."""
    config = model.config
    key = (type(model.model), repr(config.image_grid_pinpoints), config.vision_config.image_size,
           config.vision_config.patch_size)
    if key not in _LARGEST:
        _LARGEST[key] = max(layout(model, pinpoint).num_tokens for pinpoint in config.image_grid_pinpoints)
    return _LARGEST[key]


def check_image_sizes(pixel_values: Tensor, image_sizes) -> None:
    """LLaVA-NeXT's ``image_sizes`` must give one (height, width) per image, checked before the tower runs."""
    sizes = torch.as_tensor(image_sizes)
    if sizes.dim() != 2 or sizes.shape[1] != 2:
        raise ValueError(f"image_sizes must be [images, 2] (height, width of each image), got shape "
                         f"{tuple(sizes.shape)}")
    if pixel_values.dim() == 5 and sizes.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"image_sizes must give one (height, width) per image: pixel_values has "
                         f"{pixel_values.shape[0]} images, got {sizes.shape[0]} sizes")


def image_tokens(model: nn.Module) -> tuple[int, int]:
    """(visual tokens per image, protected leading tokens) at the model's own image size.

    With the 'full' strategy the first feature is the vision tower's CLS token: it is protected.
    LLaVA-NeXT: the most tokens one image can have (its count depends on the image's size).
    """
    if is_next(model):
        return largest_image_tokens(model), 0
    config = model.config
    vision = config.vision_config
    protected = 1 if config.vision_feature_select_strategy == "full" else 0
    if hasattr(vision, "image_size") and hasattr(vision, "patch_size"):
        return (vision.image_size // vision.patch_size) ** 2 + protected, protected
    return int(config.image_seq_length), protected


def feature_attention(model: nn.Module, required: bool = True) -> Optional[nn.Module]:
    """The attention module of the vision layer that produces ``hidden_states[vision_feature_layer]``;
    None where there is none and it is not ``required``."""
    layer_index = model.config.vision_feature_layer
    layers = getattr(getattr(model.model.vision_tower, "encoder", None), "layers", None)
    problem = None
    if not isinstance(layer_index, int) or layers is None:
        problem = "cls_attention needs a CLIP-style vision tower and an int vision_feature_layer"
    elif layer_index % (len(layers) + 1) == 0:
        problem = "vision_feature_layer selects the embeddings: there is no attention to read"
    if problem is not None:
        if required:
            raise UnsupportedModelError(problem)
        return None
    attention = layers[layer_index % (len(layers) + 1) - 1].self_attn
    if not all(hasattr(attention, key) for key in ("q_proj", "k_proj", "num_heads", "scale")):
        if required:
            raise UnsupportedModelError(f"cls_attention: {type(attention).__name__} has no CLIP-style q_proj/k_proj")
        return None
    return attention


# -- costs ---------------------------------------------------------------------------------------------

def cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    """Language-model MACs of one image's visual tokens (what the reduction saves), per layer."""
    language = model.model.language_model
    layer = language.layers[0]
    num_tokens, protected = image_tokens(model)
    return EncoderCost(
        num_tokens=num_tokens,
        num_protected=protected,
        num_layers=len(language.layers),
        attn_linear=linear_macs(layer.self_attn),
        attn_dim=layer.self_attn.q_proj.out_features,
        mlp_linear=linear_macs(layer.mlp),
        fixed=0.0,
        metric_dim=model.config.text_config.hidden_size,
    )


def prefill_macs(model: nn.Module, num_tokens: Tensor, kept_tokens: Optional[Union[Tensor, Sequence[Tensor]]] = None,
                 from_layer: Union[int, Sequence[int]] = 0) -> Tensor:
    """Analytic language-model prefill MACs for prompts of ``num_tokens`` real tokens (per row).

    Linear layers per token, causal attention scores and values over ``T(T+1)/2`` query-key
    pairs, and the head on the last position (what ``generate()`` computes). Norms, activations
    and softmax are left out, as every counter does. With ``kept_tokens``, layers from
    ``from_layer`` on run on that many tokens (in-LLM pruning); with lists (progressive pruning),
    layers from ``from_layer[i]`` on run on ``kept_tokens[i]`` tokens.
    """
    c = cost(model)

    def layer(t: Tensor) -> Tensor:
        t = t.double()
        return (c.attn_linear + c.mlp_linear) * t + c.attn_dim * t * (t + 1)

    kept_tokens = num_tokens if kept_tokens is None else kept_tokens
    counts = [num_tokens, *(kept_tokens if isinstance(kept_tokens, (list, tuple)) else [kept_tokens])]
    bounds = [0, *(from_layer if isinstance(from_layer, (list, tuple)) else [from_layer]), c.num_layers]
    segments = sum(layer(t) * (end - start) for t, start, end in zip(counts, bounds[:-1], bounds[1:]))
    return segments + linear_macs(model.lm_head)


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


def decision_macs(model: nn.Module, reduction: Reduction, tokens: list[int]) -> float:
    """MACs of the reducer's own decisions along one token set's steps (``tokens`` as reduce_group gives),
    before the language model: a CLS-attention row is the vision tower's, at the tower's width."""
    attention = feature_attention(model, required=False) if Need.CLS_ATTENTION in reduction.reducer.needs else None
    image_cost = replace(cost(model, reduction.metric), has_cls=attention is not None,
                         attn_dim=0 if attention is None else attention.q_proj.out_features)
    return float(sum(reduction.reducer.extra_macs(n, image_cost, m) for n, m in zip(tokens[:-1], tokens[1:]) if m < n))


# -- reducing a set of tokens --------------------------------------------------------------------------

def reduce_group(reduction: Reduction, features: Tensor, budget: int, num_protected: int = 0, *,
                 attention: Optional[Tensor] = None, query: Optional[Tensor] = None,
                 grid: Optional[tuple] = None) -> tuple[TokenState, list[int]]:
    """Reduce ``features [G, N, D]`` (G token sets of one size) to ``budget`` tokens each.

    Takes as many steps as the reducer's ``max_step`` needs (:func:`reduction_steps`); ``attention``
    ``[G, N]`` is the CLS attention to the original tokens, ``grid`` their (rows, cols). Returns the
    state and the token count entering each step, then the count kept.
    """
    steps = reduction_steps(features.shape[1], budget, reduction.reducer, num_protected)
    state = TokenState.start(features, num_protected)
    for step, remove in enumerate(steps):
        signals = Signals(
            metric=state.x, layer=step, num_layers=len(steps),
            cls_attention=None if attention is None else carried(attention, state),
            query=query, grid=None if state.is_reduced else grid,
        )
        state = reduction.reducer(state, state.num_tokens - remove, signals)
    return state, step_counts(features.shape[1], steps)


def carried(attention: Tensor, state: TokenState) -> Tensor:
    """Attention to each current token: the sum over the original tokens it carries."""
    if not state.is_reduced:
        return attention
    index = state.assignment.clamp_min(0)
    weights = attention.float() * (state.assignment >= 0)
    return weights.new_zeros(state.size.shape).scatter_add_(1, index, weights)


def padded(rows: list[Tensor], fill) -> Tensor:
    """Per-image 1-D tensors as one ``[I, longest]`` tensor, ``fill`` past each one's end."""
    width = max((len(r) for r in rows), default=0)
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=fill) for r in rows]) if rows \
        else torch.zeros(0, 0)


@dataclass
class ReducedImages:
    """Each image's reduced features and what they carry, for the compacted prompt and the report."""

    features: list[Tensor]        # [K_i, D] per image, in the order the language model reads them
    assignment: list[Tensor]      # [N_i] index of the output token carrying each original one, -1 dropped
    size: list[Tensor]            # [K_i] original tokens each output token stands for
    tokens: list[int]             # LlavaReport.tokens
    reducer_macs: float
    num_protected: int = 0
    grid: Optional[tuple] = None
    anyres: Optional[list] = None  # LLaVA-NeXT: per image, how the budget was split


# -- the report ----------------------------------------------------------------------------------------

@dataclass
class LlavaReport(Report):
    """What the last call really kept (a :class:`vtr.Report` whose batch dimension is the images).

    tokens: visual tokens per image entering each reduction step, then the count kept.
    stage_layers / stage_tokens: in-LLM pruning only: the decoder layer of each stage, and the visual
        tokens per image entering the first stage, then kept after each stage (``tokens`` lists
        every reducer step; a stage takes several when the reducer's ``max_step`` is below 1).
        When the images have different counts (LLaVA-NeXT), both give the most any image had or
        kept (``tokens`` equals ``stage_tokens``); ``image_tokens_before/after`` give each image's.
    stage_positions: in-LLM pruning only: per stage, ``[B, L_i]`` index in the caller's prompt of each
        position the layers from that stage on see, -1 for padding (the last one is ``kept_positions``).
    assignment / size: per image, as in :class:`vtr.Report` (merged tokens have size > 1).
    image_rows: ``[I]`` prompt row of each image.
    visual_tokens_before / visual_tokens_after: ``[B]`` placeholders per row in the caller's prompt
        and in the compacted prompt the language model saw (text-only rows: 0 and 0).
    kept_positions: ``[B, L']`` index in the caller's prompt of each column of the compacted prompt,
        -1 for padding; ``forward()`` logits follow these columns.
    prefill_macs / prefill_macs_unreduced: ``[B]`` analytic language-model prefill MACs per row,
        with and without the reduction (real tokens only; the vision tower is unchanged).
    reducer_macs: MACs of the reducer's own decisions for the whole batch.
    image_tokens_before / image_tokens_after: ``[I]`` visual tokens of each image before and after.
    anyres: LLaVA-NeXT only, per image an :class:`vtr.adapters.llava.anyres.AnyresSplit`: the tokens and
        budgets of its base image, its crops and its newline tokens. For LLaVA-NeXT ``tokens`` is
        [most tokens an image had, most an image kept], ``assignment`` is padded with -1 past an
        image's own token count, ``size`` with 0 past its kept count, and ``grid`` is None.
    """

    where: str = WHERE
    image_rows: Optional[Tensor] = None
    visual_tokens_before: Optional[Tensor] = None
    visual_tokens_after: Optional[Tensor] = None
    kept_positions: Optional[Tensor] = None
    prefill_macs: Optional[Tensor] = None
    prefill_macs_unreduced: Optional[Tensor] = None
    reducer_macs: float = 0.0
    stage_layers: Optional[list] = None
    stage_tokens: Optional[list] = None
    stage_positions: Optional[list] = None
    image_tokens_before: Optional[Tensor] = None
    image_tokens_after: Optional[Tensor] = None
    anyres: Optional[list] = None

    @property
    def crop_budgets(self) -> Optional[list[list[int]]]:
        """LLaVA-NeXT: per image, the tokens kept from each crop (row-major crop order)."""
        return None if self.anyres is None else [split.crop_budgets for split in self.anyres]

    @property
    def prefill_flops_saved(self) -> float:
        """Fraction of the batch's analytic language-model prefill MACs the reduction removed."""
        unreduced = float(self.prefill_macs_unreduced.sum())
        return 1.0 - (float(self.prefill_macs.sum()) + self.reducer_macs) / unreduced


def text_only_report(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor],
                     where: str = WHERE) -> LlavaReport:
    """Report of a call without images: nothing to reduce, every row passes through untouched."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    zeros = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    real = mask.sum(1)
    columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return LlavaReport(
        tokens=[], assignment=torch.zeros(0, 0, dtype=torch.long), size=torch.zeros(0, 0), num_protected=0,
        where=where, image_rows=zeros[:0], visual_tokens_before=zeros, visual_tokens_after=zeros,
        kept_positions=columns.masked_fill(mask == 0, -1), prefill_macs=prefill_macs(model, real),
        prefill_macs_unreduced=prefill_macs(model, real),
    )


# -- prompt compaction ---------------------------------------------------------------------------------

def _image_of_placeholder(placeholder: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """For each position: index of the image its placeholder belongs to, and its rank in that image.

    transformers fills placeholders with the images' features in row-major order, image after
    image, so the k-th placeholder of the batch belongs to the image whose cumulative count covers k.
    """
    order = placeholder.flatten().long().cumsum(0).view_as(placeholder) - 1
    ends = counts.cumsum(0)
    image = torch.searchsorted(ends, order.clamp_min(0), right=True).clamp_max(len(counts) - 1)
    rank = order - (ends - counts)[image]
    return image, rank


def compact_prompt(input_ids: Tensor, attention_mask: Tensor, image_token_id: int, counts: Tensor,
                   kept: Tensor, pad_id: int, left: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Drop each image's placeholders past its kept count and the old padding; pad again.

    ``counts`` / ``kept`` ``[I]``: placeholders per image before / after. Returns ``input_ids``,
    ``attention_mask`` and ``kept_positions`` (source column, -1 padding) of the compacted prompt.
    """
    placeholder = input_ids == image_token_id
    keep = attention_mask.bool()
    if counts.numel():
        image, rank = _image_of_placeholder(placeholder, counts)
        keep = torch.where(placeholder, rank < kept[image], keep)
    kept_positions = kept_columns(keep, left)
    real = kept_positions >= 0
    ids = torch.where(real, input_ids.gather(1, kept_positions.clamp_min(0)), pad_id)
    return ids, real.to(attention_mask.dtype), kept_positions


def kept_columns(keep: Tensor, left: bool = True) -> Tensor:
    """``[B, L']`` source column of each slot of the rows' kept tokens (in order), -1 for padding."""
    lengths = keep.sum(1)
    width = int(lengths.max()) if lengths.numel() else 0
    column = keep.long().cumsum(1) - 1 + ((width - lengths)[:, None] if left else 0)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(column)
    source = torch.arange(keep.shape[1], device=keep.device).expand_as(column)
    kept = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    kept[rows[keep], column[keep]] = source[keep]
    return kept


__all__ = ["AnyresLayout", "LlavaReport", "LlavaRun", "ReducedImages", "compact_prompt", "cost", "decision_macs",
           "image_tokens", "kept_columns", "largest_image_tokens", "layout", "opened", "prefill_macs",
           "reduce_group", "reduction_steps", "step_counts", "text_only_report"]
