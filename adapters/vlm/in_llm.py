"""In-LLM visual token pruning (LLaVA, Qwen-VL): FastV-style at one layer, or progressive over several.

``layers=[K1, ..., Km]`` makes m *stages*. At decoder layer Ki of the prefill, the attention the
last prompt token pays to every token still present is recomputed from the layer's own
``input_layernorm``, ``q_proj``/``k_proj`` and rotary embedding (one query row: O(L d), and it
works whatever kernel the layer uses: SDPA, eager, ...). It is given to the reducer as the
``cls_attention`` signal of each image's tokens (the hidden states are the metric; reducers that ask
for them also get the layer's keys, ``signals.keys``, and the text after the image, ``signals.instruction``:
its states, keys, attention rows and the language model's input, from a hook on the first layer), and the
reducer decides per image which of them stay (stage i keeps ``budgets[i]`` per image; one state
per image carries sizes and provenance through all stages). Layers in ``[Ki, Ki+1)`` (a
*segment*) then see stage i's sequence: hidden states, rotary embeddings and position ids gathered
(original positions kept, a merged token takes the position of the first token it carries; for
M-RoPE models the gathered rotary embeddings are the tokens' own (t, h, w) ones) and a
causal mask rebuilt for it. Every segment therefore has its own, shorter KV cache; at each decode
step the first layer of a segment builds a mask aligned with that cache (rows of a batch may have
kept different numbers of tokens) and the segment's layers share it, while layers < K1 use the
model's own mask and full cache. Static caches work too: masks span the cache's whole width.

Forward pre-hooks on the decoder layers do all of it; the model's forward and ``generate()`` run
unchanged. Needs the whole prompt in one forward on an empty cache, then one token per forward, or
without a cache the prompt and every token since (no chunked prefill, no assisted generation), and
the last column of the prompt to be a real token (left padding, as generate wants). ``labels`` follow
the positions the last layers see (:func:`compact_labels`), so the model's own loss covers them.

What sits on the model is settings only: :class:`Stages` (each stage's layer and budget) and the
hooks (:class:`StageHook`, a plain class). What a call decides (which tokens each stage keeps, the
images' states, the segment masks) is a :class:`Pruning`, made by the call's first forward and held
by the call's run (``vtr.adapters.vlm.run.VlmRun``): one ``generate()`` shares it between its prefill and decode
steps. A forward on its own makes one too; a later forward on the same KV cache (a decode loop
written by hand) continues it, since the cache holds what that prefill kept: the pruning is found
from the cache object, held weakly, and goes with the cache.

The decision is made once, from the prompt. ``generate(use_cache=False)`` sends the prompt and every
token generated so far in each forward of its run; such a forward (same run, the prefill's prompt
followed by new tokens, no cache) replays the prefill's decision instead of ranking again by the
newest token: each stage keeps the prompt columns the prefill kept, plus every new token, and the
visual tokens it leaves are the ones the prefill computed (a function of the prompt alone, as causal
attention makes them; the cached run holds exactly these in its KV cache). So ``use_cache=False``
generates what the cached run generates. A forward in a new run (a plain ``model(...)`` call) decides
from its own input.

What a family's prompt looks like comes from its :class:`Visuals` (settings, on :class:`Stages`):
which tokens are visual, and each image's (or video's) token count, placeholders and patch grid
(``vtr.adapters.llava.in_llm``, ``vtr.adapters.qwen_vl.in_llm``). Images of different sizes
(LLaVA-NeXT, Qwen-VL): ``budget=B`` means B visual tokens kept per image after the last stage: an
image with at most B keeps all; progressive stages decay from the image's own count
(:func:`image_budgets`); a list budget's counts are each capped at the image's count. Images of one
count and grid are reduced together, so every image takes exactly the reducer steps it would take
alone (a padded group would change a multi-step reducer's steps: ToMe would merge the padding first).
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from vtr.budget.visual import reduction_steps, step_counts
from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.signals import Need

from ..base import remove_hooks
from .language import decoder, language_cost, prefill_macs
from .pruning import Pruning
from .run import VlmRun
from .sequence import scoring_macs
from .stages import MULTI_TOKEN_OPTIONS, WHY, Stages, make_stages, stages_of
from .visuals import Visuals


class StageHook:
    """Forward pre-hook on each decoder layer from the first stage on: hands the layer to the call's
    :class:`Pruning` (stage: the index of the stage this layer starts, or None). Outside a call of the
    patched model it does nothing. A plain class, so a patched model pickles and deep-copies."""

    def __init__(self, reduction: Reduction, stage: Optional[int]):
        self.reduction, self.stage = reduction, stage

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        run = runs.active(self.reduction)
        pruning = run.pruning if isinstance(run, VlmRun) else None
        if pruning is None:
            return None
        return pruning.layer(self.stage, module, args, kwargs)


class InputHook:
    """Forward pre-hook on the first decoder layer, for reducers that read the prompt's text
    (``Need.INSTRUCTION``): hands the language model's input (the embedded prompt, images in place) to the call's
    :class:`Pruning` (SparseVLM picks its text raters from it). A plain class, as :class:`StageHook`."""

    def __init__(self, reduction: Reduction):
        self.reduction = reduction

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        run = runs.active(self.reduction)
        pruning = run.pruning if isinstance(run, VlmRun) else None
        if pruning is not None:
            pruning.record_input(args[0] if args else kwargs["hidden_states"])
        return None


def install(model: nn.Module, reduction: Reduction, visuals: Visuals) -> None:
    """Settings and hooks of in-LLM pruning on ``model`` (patch time)."""
    stages = make_stages(model, reduction, visuals)
    layers = decoder(model).layers
    if {Need.INSTRUCTION, Need.TEXT_ATTENTION} & reduction.reducer.needs:
        layers[0].register_forward_pre_hook(InputHook(reduction), with_kwargs=True)
    starts = {layer: index for index, layer in enumerate(stages.layers)}
    for i in range(stages.layers[0], len(layers)):
        layers[i].register_forward_pre_hook(StageHook(reduction, starts.get(i)), with_kwargs=True)
    model._vtr_stages = stages


def uninstall(model: nn.Module) -> None:
    remove_hooks(decoder(model), StageHook)
    remove_hooks(decoder(model), InputHook)
    model.__dict__.pop("_vtr_stages", None)


def check_generate(model: nn.Module, kwargs: dict) -> None:
    """Refuse generate() modes that feed the prompt in pieces or several tokens per forward (and what the
    family's :class:`Visuals` refuses), before they run."""
    config = kwargs.get("generation_config") or model.generation_config
    for option, what in MULTI_TOKEN_OPTIONS.items():
        if kwargs.get(option, getattr(config, option, None)) not in (None, False):
            raise ValueError(f"{what} ({option}=) is not supported with in-LLM pruning (layers=): {WHY}. "
                             "Leave it out, or reduce before the language model (no layers=), which supports it")
    stages_of(model).visuals.check_generate(model, kwargs)


def expected_flops(model: nn.Module, reduction: Reduction, stages: Stages) -> tuple[float, float]:
    """(reduced, unreduced) prefill MACs of the largest image's visual tokens followed by one text token (the
    shortest prompt in-LLM pruning takes: its last token scores the visual tokens and predicts): each segment on
    its stage's count, plus every stage's scoring and the reducer's decisions."""
    num_tokens, protected = stages.visuals.tokens(model)
    reducer, image_cost = reduction.reducer, language_cost(model, num_tokens, protected)
    counts, decisions = [num_tokens], 0.0
    for layer, budget in zip(stages.layers, stages.budgets):
        decisions += scoring_macs(model, layer, torch.tensor([counts[-1] + 1]))
        steps = reduction_steps(counts[-1], budget, reducer, protected) if reduction.reduces else []
        step_tokens = step_counts(counts[-1], steps)
        for n, m in zip(step_tokens[:-1], step_tokens[1:]):
            decisions += reducer.extra_macs(n, image_cost, m)
        counts.append(counts[-1] - sum(steps))
    kept = [torch.tensor([n + 1]) for n in counts[1:]]
    reduced = prefill_macs(model, torch.tensor([num_tokens + 1]), kept, list(stages.layers))
    return float(reduced) + decisions, float(prefill_macs(model, torch.tensor([num_tokens + 1])))


# -- one call: what the prefill decides and the decode steps follow --------------------------------------

_BY_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # KV cache -> the Pruning that filled it


def forward(model: nn.Module, run: VlmRun, original_forward: Callable, arguments: dict):
    """The model's forward with the call's pruning observing it (the hooks do the pruning).

    ``labels`` follow the positions the last layers saw (:func:`compact_labels`), so the loss is the
    model's own loss over the pruned sequence its logits cover.
    """
    cache = arguments.get("cache", arguments.get("past_key_values"))
    labels, as_tuple = arguments.pop("labels", None), False
    if labels is not None:
        if arguments.get("shift_labels") is not None:
            raise ValueError("shift_labels cannot be combined with in-LLM pruning (layers=): pass labels, which vtr "
                             "compacts to the positions the pruned layers keep")
        as_tuple = not arguments.get("return_dict", model.config.return_dict)
        arguments["return_dict"] = True
    if run.pruning is None:     # the first forward of the call: a new prompt, or one more step on a cache
        run.pruning = _of_cache(cache, model) or (stages_of(model).visuals.pruning_kind or Pruning)(model)
    pruning = run.pruning
    pruning.observe(arguments.get("input_ids"), arguments.get("attention_mask"), cache, arguments, run)
    try:
        output = original_forward(model, **arguments)
    finally:
        pruning.shared = {}     # what this forward's layers shared (positions, masks) ends with it
    for held in {id(c): c for c in (cache, getattr(output, "cache", None)) if c is not None}.values():
        try:                    # the cache passed in, or the one the forward made: later forwards on it continue
            _BY_CACHE[held] = pruning
        except TypeError:       # a cache that cannot be referenced weakly: forwards on it start afresh
            pass
    if labels is not None:
        options = {k: arguments[k] for k in ("num_items_in_batch", "ignore_index") if k in arguments}
        compact = compact_labels(labels, pruning.positions, arguments.get("ignore_index", -100))
        loss = model.loss_function(logits=output.logits, labels=compact,
                                   vocab_size=model.config.text_config.vocab_size, **options)
        output = type(output)(**{**output, "loss": loss})     # loss first, as the model's own output has it
        return output.to_tuple() if as_tuple else output
    return output


def compact_labels(labels: Tensor, positions: Optional[Tensor], ignore_index: int = -100) -> Tensor:
    """``labels`` ``[B, L]`` of the caller's sequence at ``positions`` ``[B, L']`` (the columns the pruned
    layers kept, -1 padding), ``ignore_index`` at padding: the labels of pruned positions go as their
    hidden states went. ``positions`` None: the forward pruned nothing, labels as given."""
    if positions is None:
        return labels
    positions = positions.to(labels.device)
    return labels.gather(1, positions.clamp_min(0)).masked_fill(positions < 0, ignore_index)


def _of_cache(cache, model: nn.Module) -> Optional["Pruning"]:
    """The pruning an earlier forward of ``model`` left for the prompt in ``cache``, if any."""
    try:
        pruning = _BY_CACHE.get(cache) if cache is not None else None
    except TypeError:
        return None
    return pruning if pruning is not None and pruning.reduction is model._vtr else None
