"""Qwen-VL reduction inside the vision tower (``tower_layer=K``): after tower block K each image (each video) keeps
``budget`` whole 2x2 merge units, so the blocks after K, the patch merger and the language model see only those.

Why whole units: the merger turns each 2 x 2 group of patches (a *unit*) into one language-model token, and
Qwen2.5-VL's windows are made of whole units. Dropping whole units keeps every later block, the merger and the
prompt exactly what they are for a smaller image: a kept unit is the token the language model would have read,
at its own M-RoPE position (``before_lm``'s position logic, unchanged).

At block K (hooks on the tower's own modules; its forward and fused attention kernels run unchanged):

- *Signals*: the unit's features are its four patches' hidden states after block K, concatenated (``[4 C]``:
  what merging and diversity methods compare; a merge is then per patch, so a merged unit is still four patches);
  the attention a unit receives is the mean over its four patches of what each receives in block K, recomputed
  from the block's own q and k (``received.received_per_patch``) and scaled by its attention chunk's length
  (1 = uniform), so units of windows of different sizes compare fairly.
- *Decision*: the same per-image (per-frame for videos) reduction as before the language model
  (``vtr.adapters.vlm.items.reduce_items``), on the units in raster order.
- *After K*: each kept (or merged) unit sits where its representative (the first unit it carries) was, with its
  representative's rotary embeddings; each attention chunk is recomputed from the kept units: a window keeps its
  own units (attention never crosses windows), a full-attention block sees every kept unit of its image (frame).
  The merger (and Qwen3-VL's DeepStack mergers from block K on) runs on the kept units only; its output is put
  back at each representative's place so transformers' own reordering and per-image split still hold, and
  ``before_lm`` reads it there. DeepStack levels taken before block K ran on every unit and follow the same
  decision (a merged unit's level is the mean of its units', as before the language model).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vtr.budget.cost import EncoderCost
from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.signals import Need
from vtr.reducers.base import Reducer

from ..base import remove_hooks
from ..steps import linear_macs
from . import received

KEY = ("tower",)   # where the run keeps the tower call being reduced
# Signals a method may need that the tower does not give at block K: a method needing one is refused at patch time.
NOT_OFFERED = {Need.QUERY: "a text query", Need.PARTITION: "a partition of the tokens",
               Need.INSTRUCTION: "the prompt's text inside the language model",
               Need.TEXT_ATTENTION: "the text's attention inside the language model"}


# -- patch time ------------------------------------------------------------------------------------------

def depth(model: nn.Module) -> int:
    return len(model.model.visual.blocks)


def check(model: nn.Module, reducer: Reducer, tower_layer, budget, layers) -> None:
    """Refuse what reducing inside the tower cannot do, naming the option and what is allowed."""
    blocks = depth(model)
    if isinstance(tower_layer, bool) or not isinstance(tower_layer, int) or not 0 <= tower_layer < blocks:
        raise ValueError(f"tower_layer must be an int in [0, {blocks - 1}] (the vision block after which whole 2x2 "
                         f"merge units are dropped; this tower has {blocks} blocks), got {tower_layer!r}")
    name = reducer.name
    if "tower" not in reducer.stages:
        raise ValueError(f"method {name!r} does not act in a vision tower (its stages: {', '.join(reducer.stages)}); "
                         "leave out tower_layer=")
    if reducer.fixed_count or reducer.identity or reducer.acts_before_blocks or reducer.learned:
        raise ValueError(f"method {name!r} cannot reduce inside the Qwen-VL tower (tower_layer=): it keeps no "
                         "budget of units chosen after a block; use a method that ranks or merges units "
                         "(evit, fastv, visionzip, vispruner, fastervlm, divprune, random, tome)")
    lacking = [NOT_OFFERED[need] for need in sorted(reducer.needs & set(NOT_OFFERED), key=str)]
    if lacking:
        raise ValueError(f"method {name!r} needs {', '.join(lacking)}, which the vision tower does not give at block "
                         f"{tower_layer}: inside the tower a method gets each 2x2 unit's features, the attention it "
                         "receives there and its grid. Leave out tower_layer= to reduce after the tower")
    if layers is not None:
        raise ValueError("tower_layer= reduces inside the vision tower and layers= inside the language model: give "
                         "one of them")
    if budget is None or isinstance(budget, (list, tuple)):
        raise ValueError(f"tower_layer= needs budget= as one int (2x2 units, i.e. language-model tokens, kept per "
                         f"image or video), got budget={budget!r}")


def install(model: nn.Module, reduction: Reduction) -> None:
    """Patch time: the hooks on block K (signals, decision, the shorter sequence), on the blocks after it (their
    attention chunks and rotary embeddings) and on the mergers (outputs back at each representative's place)."""
    visual, layer = model.model.visual, reduction.visual.tower_layer
    wants_received = Need.ATTENTION_RECEIVED in reduction.reducer.needs
    if wants_received:   # block K's own qkv output is kept for the pass (nothing projected twice)
        visual.blocks[layer].attn.qkv.register_forward_hook(received.KeepQKV())
        visual.blocks[layer].attn.register_forward_hook(ReceivedAtK(), with_kwargs=True)
    visual.blocks[layer].register_forward_hook(DropAfterK(), with_kwargs=True)
    windowed = set(range(len(visual.blocks))) - set(getattr(visual, "fullatt_block_indexes", None) or
                                                   range(len(visual.blocks)))
    for index in range(layer + 1, len(visual.blocks)):
        visual.blocks[index].register_forward_pre_hook(KeptSequence(index in windowed), with_kwargs=True)
    for merger in [visual.merger, *getattr(visual, "deepstack_merger_list", [])]:
        merger.register_forward_hook(AtRepresentatives())


def uninstall(model: nn.Module) -> None:
    for kind in (received.KeepQKV, ReceivedAtK, DropAfterK, KeptSequence, AtRepresentatives):
        remove_hooks(model, kind)


# -- one tower call --------------------------------------------------------------------------------------

@dataclass
class TowerCall:
    """One tower call (a call's images, or its videos) reduced inside the tower: set by ``before_lm`` before it
    calls the tower, filled by the hooks.

    decide: ``(unit features per item [N, 4C], received per item [N] or None) -> (items, reduced)``, the
    before-LM decision on the units in raster order.
    """

    visual: nn.Module
    grid_thw: Tensor
    decide: Callable
    received: Optional[Tensor] = None      # [seq] per patch in the block's order, scaled by its chunk's length
    received_macs: float = 0.0
    items: Optional[list] = None
    reduced: Optional[list] = None
    kept: Optional[Tensor] = None          # [K] block-order unit of each kept unit, in the new sequence's order
    total_units: int = 0
    sequences: dict = field(default_factory=dict)   # what the blocks after K get: chunks and rotary embeddings


def current() -> Optional[TowerCall]:
    run = runs._ACTIVE.get()
    return None if run is None else run.captured.get(KEY)


def start(run, call: TowerCall) -> None:
    run.captured[KEY] = call


def finish(run) -> Optional[TowerCall]:
    return run.captured.pop(KEY, None)


class ReceivedAtK:
    """Forward hook (with kwargs) on block K's attention: the attention each patch receives there, in the block's
    order, scaled by the length of its chunk (a window or a frame) so that 1 is uniform everywhere."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        call = current()
        if call is None:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        bounds = kwargs["cu_seqlens"]
        qkv = runs._ACTIVE.get().captured.pop(received.QKV, None)
        with torch.no_grad():
            per_patch = received.received_per_patch(module, hidden, bounds, kwargs["position_embeddings"], qkv)
        lengths = bounds.diff().to(per_patch.device)
        call.received = per_patch * lengths.repeat_interleave(lengths).to(per_patch.dtype)
        call.received_macs = float((lengths.double() ** 2).sum()) * module.qkv.in_features


class DropAfterK:
    """Forward hook (with kwargs) on block K: decide per image, return the kept units' hidden states and set what
    the later blocks get. Keeps the output untouched when every unit stays (then the tower is the unpatched one)."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Optional[Tensor]:
        call = current()
        if call is None:
            return None
        visual = call.visual
        unit = visual.spatial_merge_size ** 2
        width = output.shape[-1]
        block_units = output.reshape(-1, unit * width)                        # [U, 4C] in the block's order
        window = received.window_index(visual, call.grid_thw)
        to_block = None if window is None else torch.argsort(window.to(output.device))   # raster unit -> block
        raster = block_units if to_block is None else block_units[to_block]
        counts = (call.grid_thw.prod(dim=-1) // unit).tolist()
        scores = None
        if call.received is not None:
            per_unit = call.received.view(-1, unit).mean(dim=1)
            scores = list((per_unit if to_block is None else per_unit[to_block]).split(counts))
        call.items, call.reduced = call.decide(list(raster.split(counts)), scores)
        call.total_units = block_units.shape[0]
        if all(len(r.first) == item.num_tokens and bool((r.size == 1).all())
               for item, r in zip(call.items, call.reduced)):
            return None                                                       # nothing dropped or merged
        offsets = [0, *torch.tensor(counts).cumsum(0).tolist()[:-1]]
        first = torch.cat([r.first + offset for r, offset in zip(call.reduced, offsets)]).to(output.device)
        features = torch.cat([r.features for r in call.reduced]).to(output.device, output.dtype)
        kept = first if to_block is None else to_block[first]                 # block-order unit of each
        kept, order = kept.sort()
        call.kept = kept
        rows = (kept[:, None] * unit + torch.arange(unit, device=kept.device)).flatten()   # their patches
        cos, sin = kwargs["position_embeddings"]
        full, windows = _chunks(visual, call.grid_thw)
        patches = kept * unit
        call.sequences = {"position_embeddings": (cos[rows], sin[rows]),
                          "full": _kept_bounds(full.to(kept.device), patches, unit),
                          "window": None if windows is None else _kept_bounds(windows.to(kept.device), patches, unit)}
        return features[order].reshape(-1, width)


class KeptSequence:
    """Forward pre-hook (with kwargs) on a block after K: the kept units' attention chunks (its windows or its
    full-attention chunks, recomputed from the kept units) and rotary embeddings."""

    def __init__(self, windowed: bool):
        self.windowed = windowed

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        call = current()
        if call is None or call.kept is None:
            return None
        bounds = call.sequences["window" if self.windowed else "full"]
        kwargs["cu_seqlens"] = bounds
        if kwargs.get("max_seqlen") is not None:    # flash attention reads it
            kwargs["max_seqlen"] = int(bounds.diff().max())
        kwargs["position_embeddings"] = call.sequences["position_embeddings"]
        return args, kwargs


class AtRepresentatives:
    """Forward hook on the patch merger (and DeepStack's): after the drop its output has one row per kept unit;
    put each at its representative's place of the full unit sequence (zeros elsewhere), so transformers' own
    reordering and per-image split hold; ``before_lm`` reads the kept places only."""

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Optional[Tensor]:
        call = current()
        if call is None or call.kept is None:
            return None
        full = output.new_zeros(call.total_units, output.shape[-1])
        full[call.kept] = output
        return full


def _chunks(visual: nn.Module, grid_thw: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """(full-attention chunks, window chunks or None) of the tower for ``grid_thw``, in patches, as its forward
    builds them (transformers' own functions)."""
    from transformers.vision_utils import get_vision_cu_seqlens
    full = get_vision_cu_seqlens(grid_thw)
    if not hasattr(visual, "fullatt_block_indexes"):
        return full, None
    from transformers.vision_utils import get_vision_window_index
    _, windows = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                         window_size=visual.window_size, patch_size=visual.patch_size)
    return full, windows


def _kept_bounds(bounds: Tensor, patches: Tensor, unit: int) -> Tensor:
    """The chunk boundaries ``bounds`` (in patches) of a sequence that keeps only the units starting at ``patches``
    (sorted): each chunk keeps its own kept units, empty chunks vanish."""
    chunk = torch.searchsorted(bounds.long(), patches, right=True) - 1
    counts = torch.bincount(chunk, minlength=len(bounds) - 1) * unit
    kept = F.pad(counts.cumsum(0), (1, 0)).to(bounds.dtype)
    return torch.unique_consecutive(kept)


# -- multiply-accumulates ---------------------------------------------------------------------------------

def unit_cost(model: nn.Module, language: EncoderCost) -> EncoderCost:
    """``language`` (the language model's cost, what before-LM decisions are priced with) with the widths a decision
    on units compares: ``[4 C]`` unit features, the tower's attention width."""
    width = model.model.visual.blocks[0].attn.qkv.in_features
    return dataclasses.replace(language, metric_dim=model.model.visual.spatial_merge_size ** 2 * width,
                               attn_dim=width)


def block_macs(block: nn.Module, bounds: Tensor) -> float:
    """A tower block on the chunks ``bounds`` (patches): its linear layers per patch, q.k and attention.v per chunk."""
    lengths = bounds.diff().double()
    return float(lengths.sum()) * linear_macs(block) + 2.0 * block.attn.qkv.in_features * float((lengths ** 2).sum())


def tower_macs(visual: nn.Module, grid_thw: Tensor, layer: Optional[int] = None,
               kept_bounds: Optional[dict] = None, kept_units: Optional[int] = None) -> float:
    """The tower's multiply-accumulates on ``grid_thw``: patch embedding, blocks, merger and DeepStack mergers
    (what a FLOP counter sees: norms, activations and rotary embeddings are not counted). With ``layer`` and the
    kept sequence (``kept_bounds``: its "full" and "window" chunks, ``kept_units``), the blocks after ``layer`` and
    the mergers from it on run on the kept units."""
    unit = visual.spatial_merge_size ** 2
    full, windows = _chunks(visual, grid_thw)
    patches = float(full[-1])
    total = patches * float(visual.patch_embed.proj.weight[0].numel()) * visual.patch_embed.proj.out_channels
    windowed = set(range(len(visual.blocks))) - set(getattr(visual, "fullatt_block_indexes", None) or
                                                   range(len(visual.blocks)))
    reduced = layer is not None and kept_bounds is not None
    for index, block in enumerate(visual.blocks):
        after = reduced and index > layer
        source = kept_bounds if after else {"full": full, "window": windows}
        total += block_macs(block, source["window" if index in windowed else "full"])
    units = patches / unit
    after_units = float(kept_units) if reduced else units
    total += after_units * linear_macs(visual.merger)
    for level, merger in zip(getattr(visual, "deepstack_visual_indexes", []) or [],
                             getattr(visual, "deepstack_merger_list", [])):
        total += (after_units if reduced and level >= layer else units) * linear_macs(merger)
    return total


def call_macs(call: TowerCall, visual: nn.Module, layer: int) -> tuple[float, float]:
    """(as run, unreduced) tower multiply-accumulates of one finished tower call."""
    unreduced = tower_macs(visual, call.grid_thw)
    if call.kept is None:
        return unreduced, unreduced
    bounds = {key: value for key, value in call.sequences.items() if key in ("full", "window")}
    return tower_macs(visual, call.grid_thw, layer, bounds, len(call.kept)), unreduced


def expected_macs(model: nn.Module, reduction: Reduction, side: int) -> tuple[float, float]:
    """(reduced, unreduced) tower multiply-accumulates of a ``side x side``-unit reference image keeping
    ``min(budget, side^2)`` units, spread evenly over its windows (each window keeps the same fraction of its units:
    the analytic count cannot know where a method's units fall), plus the attention each patch receives at block K
    for methods ranking by it."""
    visual = model.model.visual
    merge = visual.spatial_merge_size
    grid = torch.tensor([[1, side * merge, side * merge]])
    unreduced = tower_macs(visual, grid)
    count = side * side
    kept = min(reduction.visual.budget, count)
    full, windows = _chunks(visual, grid)
    fraction = kept / count
    scaled = {"full": full.double() * fraction, "window": None if windows is None else windows.double() * fraction}
    reduced = tower_macs(visual, grid, reduction.visual.tower_layer, scaled, kept)
    if Need.ATTENTION_RECEIVED in reduction.reducer.needs:
        layer = reduction.visual.tower_layer
        at_k = windows if windows is not None and layer not in visual.fullatt_block_indexes else full
        reduced += float((at_k.diff().double() ** 2).sum()) * visual.blocks[layer].attn.qkv.in_features
    return reduced, unreduced
