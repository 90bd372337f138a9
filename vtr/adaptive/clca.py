"""Cross-Layer Cache Aggregation (CLCA; Rios et al., "Cross-Layer Cache Aggregation for Token Reduction in
Ultra-Fine-Grained Image Recognition", ICASSP 2025, arXiv 2501.00243).

A token reduction at a very low keep rate throws information away for good. CLCA keeps it within reach: a
**cross-layer cache** holds, for every block that reduces, what its step removed, and a **cross-layer
aggregation (CLA) head** reads the cache beside the model's own classifier input at the end. Here it sits on
top of any training-free vtr reducer (``reducer=``, with ``r=``/``keep=``/``flops=`` as ``vtr.patch``):

- The cache, per reducing block: the step's ``removed`` tokens (from vtr's own provenance: a token is removed
  when the step drops it, or merges it with another, so it no longer exists as itself), which originals they
  carried, their size-weighted mean (the summary the head reads), and the summary of what was kept (the CLS
  token, or the size-weighted mean of the kept tokens without one: the paper's CLA head reads the CLS token
  at every reduction layer). The paper's cache holds summaries too (the mean of the tokens, and learned
  carrier tokens); it re-injects them as tokens at the next reduction, where this one hands them straight
  to the head (no block runs on them, so the blocks' FLOPs are the reducer's).
- The head (the paper's, with LayerNorm for its BatchNorm so batched rows stay independent in training): one
  slot per input (the classifier's input, then every block's kept summary, then every block's removed
  summary), each normalised, mixed across slots per channel (the paper's depthwise convolution over layers,
  ``hidden`` outputs per channel, 2 as the paper), GELU, and a linear map to the classes. A slot whose block
  removed nothing in that row weighs exactly 0.
- Unlike the paper, which trains a new classifier in place of the model's, the head's output is **added** to
  the model's own logits and its last layer starts at zero: the patched model before training is the reduced
  model exactly, and with nothing removed it is the unpatched model. Training the head with the backbone
  frozen (``vtr.adaptive.trainable``) then only adds what the cache tells.

The head runs in ``model(x)`` (it hooks ``model.head``); ``forward_head`` called on its own sees no cache.
"""
from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.state import TokenState
from ..reducers import REDUCERS
from . import calls

_OPEN: ContextVar[dict] = ContextVar("vtr_clca_open", default={})


@dataclass(frozen=True)
class CacheEntry:
    """What one block's reduction step removed, in one pass.

    ``layer``: the block. ``removed`` ``[B, N]``: the step's input tokens it removed (dropped, or merged with
    another token). ``originals`` ``[B, N0]``: the original tokens those carried. ``removed_mean`` ``[B, C]``: their
    size-weighted mean (0 where a row removed nothing), ``removed_size`` ``[B]`` their total size, ``kept`` ``[B, C]``
    the summary of what the step kept (its CLS token, or the size-weighted mean of the kept tokens)."""

    layer: int
    removed: Tensor
    originals: Tensor
    removed_mean: Tensor
    removed_size: Tensor
    kept: Tensor


def removed_tokens(before: TokenState, after: TokenState) -> Tensor:
    """``[B, N]`` True for each token of ``before`` that a step leading to ``after`` removed: dropped, or merged
    with another token into one (its destination, read from the provenance, receives more than one token)."""
    batch, num_tokens = before.size.shape
    first = before.first_carried()                               # [B, N], N0 for a token carrying nothing
    dest = after.assignment.gather(1, first.clamp_max(before.num_original - 1))
    dest = torch.where(first < before.num_original, dest, -1)
    slot = torch.where(dest >= 0, dest, after.num_tokens)
    counts = torch.zeros(batch, after.num_tokens + 1, dtype=torch.long, device=dest.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    removed = (dest < 0) | (counts.gather(1, slot) > 1)
    removed[:, :before.num_protected] = False
    return removed


def entry(layer: int, before: TokenState, after: TokenState) -> CacheEntry:
    """The cache entry of one step from its input and output states."""
    removed = removed_tokens(before, after)
    weight = before.size * removed
    total = weight.sum(1)
    mean = (before.x * weight[..., None].to(before.x.dtype)).sum(1) / total.clamp_min(1e-6)[:, None].to(before.x.dtype)
    carried = removed.gather(1, before.assignment.clamp_min(0)) & (before.assignment >= 0)
    if after.num_protected:
        kept = after.x[:, :after.num_protected].mean(1)
    else:
        share = after.size[..., None].to(after.x.dtype)
        kept = (after.x * share).sum(1) / share.sum(1).clamp_min(1e-6)
    return CacheEntry(layer, removed, carried, mean, total, kept)


class CrossLayerHead(nn.Module):
    """CLCA's modules for one model: the CLA head. Registered on the patched model as ``_vtr_adaptive``, so it
    trains, saves (``strict=True`` round trip) and moves with it; ``vtr.unpatch`` removes it."""

    name = "clca"

    def __init__(self, width: int, num_layers: int, num_classes: int, hidden: int = 2):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"clca: hidden must be an int >= 1 (outputs per channel of the head's mix across layers; "
                             f"2 as the paper), got {hidden!r}")
        self.width, self.num_layers, self.hidden = width, num_layers, hidden
        slots = 1 + 2 * num_layers   # the classifier's input, then kept summaries, then removed summaries
        self.norm_weight = nn.Parameter(torch.ones(slots, width))
        self.norm_bias = nn.Parameter(torch.zeros(slots, width))
        bound = 1 / math.sqrt(slots)
        self.mix = nn.Parameter(torch.empty(slots, width, hidden).uniform_(-bound, bound))
        self.mix_bias = nn.Parameter(torch.zeros(width, hidden))
        self.out = nn.Linear(width * hidden, num_classes)
        nn.init.zeros_(self.out.weight)   # starts as no change: the model's own logits
        nn.init.zeros_(self.out.bias)

    def slots(self, features: Tensor, entries: Sequence[CacheEntry]) -> tuple[Tensor, Tensor]:
        """``[B, S, C]`` the head's inputs and ``[B, S]`` which are present, from the classifier's input and the
        cache of this pass."""
        batch, layers = features.shape[0], self.num_layers
        inputs = features.new_zeros(batch, 1 + 2 * layers, self.width)
        present = features.new_zeros(batch, 1 + 2 * layers)
        inputs[:, 0], present[:, 0] = features, 1
        for found in entries:
            if not 0 <= found.layer < layers:
                raise ValueError(f"clca: a reduction at block {found.layer}, but the head was built for "
                                 f"{layers} blocks")
            some = (found.removed_size > 0).to(features.dtype)
            inputs[:, 1 + found.layer] = found.kept.to(features.dtype)
            inputs[:, 1 + layers + found.layer] = found.removed_mean.to(features.dtype)
            present[:, 1 + found.layer] = some
            present[:, 1 + layers + found.layer] = some
        return inputs, present

    def forward(self, inputs: Tensor, present: Tensor) -> Tensor:
        """Logits to add to the model's: ``inputs`` ``[B, S, C]``, ``present`` ``[B, S]`` (absent slots weigh 0)."""
        normed = F.layer_norm(inputs, (self.width,)) * self.norm_weight + self.norm_bias
        normed = normed * present[..., None]
        mixed = torch.einsum("bsc,sch->bch", normed, self.mix) + self.mix_bias
        return self.out(F.gelu(mixed).flatten(1))

    def extra_repr(self) -> str:
        return f"width={self.width}, num_layers={self.num_layers}, hidden={self.hidden}"


# -- the hooks: a cache per call of the model, filled by the reducer, read by the classifier --------------------

class OpenCache:
    """Forward pre-hook on the model: a fresh cache for this call (a stack, so a nested call has its own)."""

    def __init__(self, head: CrossLayerHead):
        self.head = head

    def __call__(self, module, args):
        table = dict(_OPEN.get())
        table[self.head] = table.get(self.head, ()) + ([],)
        _OPEN.set(table)


class CloseCache:
    """Forward hook on the model (always called, also when the call raises): drop this call's cache."""

    def __init__(self, head: CrossLayerHead):
        self.head = head

    def __call__(self, module, args, output):
        table = dict(_OPEN.get())
        stack = table.get(self.head, ())[:-1]
        if stack:
            table[self.head] = stack
        else:
            table.pop(self.head, None)
        _OPEN.set(table)


def _current(head: CrossLayerHead) -> Optional[list]:
    stack = _OPEN.get().get(head, ())
    return stack[-1] if stack else None


class FillCache:
    """Forward hook on the reducer: the step's entry goes into the open cache."""

    def __init__(self, head: CrossLayerHead):
        self.head = head

    def __call__(self, module, args, output):
        cache = _current(self.head)
        if cache is None or output is args[0]:   # a step that kept everything returns its input
            return
        if output.mask is not None:
            raise ValueError("clca: the reducer returned a masked state (training-time masking); CLCA caches what a "
                             "step removes and needs reducers that remove tokens")
        found = entry(args[2].layer, args[0], output)
        cache.append(found)
        calls.record_entry(self.head, found)


class AddHead:
    """Forward hook on the model's classifier: its logits plus the CLA head's, read from this call's cache."""

    def __init__(self, head: CrossLayerHead):
        self.head = head

    def __call__(self, module, args, output):
        entries = _current(self.head) or []
        return output + self.head(*self.head.slots(args[0], entries)).to(output.dtype)


HOOKS = (OpenCache, CloseCache, FillCache, AddHead)

# ``vtr.patch`` / ``vtr.unpatch``, which put the reducer CLCA sits on into the model. They live in ``vtr.api``, a
# layer above this package (which the api imports): the api hands them over when it loads (``use_reducer_api``).
_REDUCER_API: dict = {}


def use_reducer_api(patch: Callable, unpatch: Callable) -> None:
    """Called once by ``vtr.api`` with its ``patch`` and ``unpatch``."""
    _REDUCER_API.update(patch=patch, unpatch=unpatch)


def build(model: nn.Module, reducer: str = "evit", hidden: int = 2, r=None, keep=None, flops=None, layers=None,
          reducer_options: Optional[dict] = None) -> CrossLayerHead:
    """Patch ``model`` with the reducer named ``reducer`` (``vtr.patch(model, reducer, r=, keep=, flops=, layers=,
    **reducer_options)``) and build the CLA head for it (``vtr.adaptive.patch`` checks the model first and
    calls :func:`attach` after)."""
    if not isinstance(reducer, str) or reducer not in REDUCERS:
        raise ValueError(f"clca: reducer must be the name of a vtr reducer (vtr.methods()), got {reducer!r}")
    if REDUCERS[reducer].learned:
        raise ValueError(f"clca: reducer {reducer!r} is a learned reducer; CLCA trains its head on a training-free "
                         "reducer's removals (tome, pitome, evit, ...)")
    if reducer_options is not None and not isinstance(reducer_options, dict):
        raise ValueError(f"clca: reducer_options must be a dict of the reducer's options, got {reducer_options!r}")
    head = model.head
    if not isinstance(head, nn.Linear):
        raise ValueError(f"clca: model.head must be the classifier (nn.Linear), got {type(head).__name__}; CLCA adds "
                         "its logits to the classifier's")
    check = CrossLayerHead(model.embed_dim, len(model.blocks), head.out_features, hidden)   # options first
    amounts = {k: v for k, v in (("r", r), ("keep", keep), ("flops", flops), ("layers", layers)) if v is not None}
    _REDUCER_API["patch"](model, reducer, **amounts, **(reducer_options or {}))
    return check


def attach(model: nn.Module, head: CrossLayerHead) -> None:
    """The hooks that open the cache per call, fill it at each reduction step and add the head's logits."""
    model.register_forward_pre_hook(OpenCache(head))
    model.register_forward_hook(CloseCache(head), always_call=True)
    model._vtr.reducer.register_forward_hook(FillCache(head))
    model.head.register_forward_hook(AddHead(head))


def detach(model: nn.Module) -> None:
    """Undo :func:`build` and :func:`attach` (the head itself is removed by ``vtr.adaptive.unpatch``)."""
    from ..adapters import remove_hooks

    for kind in HOOKS:
        remove_hooks(model, kind)
        remove_hooks(model._vtr.reducer, kind)
    _REDUCER_API["unpatch"](model)
